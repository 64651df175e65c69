// The reward client GRPO calls: POSTs OpenRLHF's /get_reward protocol to one or more reward
// servers (`ptk reward-server`, or OpenRLHF's own), splitting a call into chunks spread round-robin
// over the URLs, with bounded concurrency, timeouts, retries with exponential backoff, and a clear
// ptk::Error once a chunk has failed on every attempt. It never substitutes a zero (or any default)
// reward for a failed request. Not the server (reward_server.h), not the verifiers (verifiers.h).
//
// Threading and ownership: a RewardClient owns a pool of kept-alive connections per URL. score()
// may be called from several threads at once; each call runs at most `max_concurrency` requests in
// parallel (its own threads) and returns only when every chunk has an answer or one chunk failed.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace ptk::reward {

struct RewardClientOptions {
  // Server base URLs, e.g. "http://127.0.0.1:5000" (the path /get_reward is appended; a URL that
  // already ends in /get_reward is taken as is). At least one.
  std::vector<std::string> urls;
  std::string api_key;            // sent as `Authorization: Bearer <api_key>` when set
  double connect_timeout_s = 5;   // TCP connect
  double timeout_s = 120;         // read/write of one request (scoring a large chunk takes time)
  int max_attempts = 5;           // per chunk, over all URLs; then score() throws
  double backoff_s = 0.5;         // wait before retry k: backoff_s * 2^(k-1), capped at max_backoff_s
  double max_backoff_s = 10;
  int64_t max_items_per_request = 256;  // a call with more queries is split into chunks
  int max_concurrency = 4;        // chunks in flight at once per score() call
};

struct RewardResult {
  std::vector<double> rewards;  // one per query, what the policy is trained on
  std::vector<double> scores;   // the server's `scores` (equal to rewards for ptk's server)
  // Per-source values (`rm`, verifier names, ...), one per query, as the servers sent them; a key
  // missing from some chunk's answer is an error, never filled in.
  std::map<std::string, std::vector<double>> extra_logs;
};

class RewardClient {
 public:
  // Throws ptk::Error for no URL, a malformed URL or a non-positive limit.
  explicit RewardClient(RewardClientOptions options);
  ~RewardClient();
  RewardClient(const RewardClient&) = delete;
  RewardClient& operator=(const RewardClient&) = delete;

  // Rewards for `queries` (prompt + response texts). `prompts` and `labels` are empty or one per
  // query. Retries connection failures, timeouts, 5xx, 408 and 429 with backoff, moving to the next
  // URL on each retry; a 4xx answer (bad request) is not retried. Throws ptk::Error naming every
  // attempt's URL and failure when a chunk fails max_attempts times, or when an answer is malformed
  // (wrong length, not numbers).
  RewardResult score(const std::vector<std::string>& queries, const std::vector<std::string>& prompts,
                     const std::vector<std::string>& labels);

  // Requests sent, retries made (attempts after the first) since construction; for logs and tests.
  int64_t requests() const;
  int64_t retries() const;
  // Requests answered by each URL, in options.urls order.
  std::vector<int64_t> answered_per_url() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::reward
