// `ptk reward-server`: OpenRLHF's remote reward-model protocol over HTTP (reward/http_server.h), scoring
// with a reward model (Qwen2ForSequenceClassification folder) and/or rule verifiers, each source
// weighted. POST /get_reward {"query": [...], "prompts": [...], "labels": [...]} ->
// {"rewards": [...], "scores": [...], "extra_logs": {"<source>": [...]}}; GET /health; GET /metrics.
// Not the client (reward_client.h) and not RM training (rm_stage.h).
//
// Threading and ownership: a RewardServer owns the model, the tokenizer and one batcher thread.
// Only the batcher thread runs the model; HTTP worker threads tokenize, queue their items and wait
// for the batcher, run the verifiers themselves, and answer; one event-loop thread owns the sockets.
// serve() blocks the calling thread until stop(); stop() may be called from any thread (e.g. a
// signal-watching thread) and is idempotent. The destructor stops and joins everything.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/config/sections.h"  // Section, RootSection, RunSection

namespace ptk::reward {

// The `reward` recipe section (what `ptk reward-server --recipe` reads).
struct RewardSection : config::Section {
  // Sources
  std::string model;                     // reward-model folder; "" = no model
  double model_weight;
  std::vector<std::string> verifiers;    // rule verifiers by name (verifiers.h)
  std::vector<double> verifier_weights;  // one per verifier; empty = all 1
  bool append_eos;
  // Network
  std::string host;
  int64_t port;
  std::string api_key;
  int64_t http_threads, max_connections;
  double header_timeout_s, request_timeout_s, idle_timeout_s;
  // Limits
  int64_t max_body_bytes, max_buffered_bytes, max_items, max_tokens_per_item;
  // Batching
  int64_t max_batch_items, max_batch_tokens, max_wait_ms;
  const char* name() const override { return "reward"; }
  const char* help() const override { return "the reward server: sources, network, limits, batching"; }
  void visit(config::Visitor& v) override;
  void validate(config::Errors& e) const override;
};

struct RewardRecipe {
  config::RootSection root;
  config::RunSection run;
  RewardSection reward;
  std::vector<config::Section*> sections() { return {&root, &run, &reward}; }
};

class RewardServer {
 public:
  // Loads the model (if any) onto `device` (runtime::resolve_device of run.device / --device) and
  // checks the verifier names; throws ptk::Error on a bad folder or name. Scores come back to the host
  // once per batch.
  explicit RewardServer(const RewardSection& options, const at::Device& device = at::kCPU);
  ~RewardServer();
  RewardServer(const RewardServer&) = delete;
  RewardServer& operator=(const RewardServer&) = delete;

  // Binds host:port (port 0 = a free one) and starts the batcher; returns the bound port. Throws
  // ptk::Error when the address is taken.
  int bind();
  // Serves until stop(). Call after bind().
  void serve();
  // Stops accepting, finishes (or fails) queued work, joins the batcher. Thread-safe, idempotent.
  void stop();

  // The bound port (after bind()).
  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::reward
