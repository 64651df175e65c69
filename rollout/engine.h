// The rollout engine: batched sampling from a Qwen2Model over its preallocated KV cache of S
// slots, with continuous batching (a finished sample's slot is refilled from the queue at once)
// and prompt sharing (a prompt is prefilled once; its KV is copied into the slots of its G samples).
// Not text-aware (token ids only; stop strings need a token -> bytes table), not a server, not GRPO.
//
// Algorithm of one iteration: (1) admit queued samples into free slots, in request order; a
// request's prompt minus its last token is prefilled once (prompts of similar length batched,
// others one by one, so little compute goes to padding) and copied into its samples' slots, or
// copied from a live sample of the same request; (2) one decode step over every busy slot (a new
// sample feeds its prompt's last token); (3) the sampler chain picks one token per slot; finished
// samples free their slots. Steps (2) and (3) run either on the host (ids, positions and sampling
// parameters built each step; the packed AVX-512 path on CPUs) or, with EngineOptions::device_loop
// (the default on CUDA), as one fixed-shape step on the device (rollout/device_loop.h) whose state
// stays there: one host->device and one device->host copy per step, CUDA graphs.
//
// Reproducibility: sample g of a request seeded s draws with the uniform sample_uniform(s, g,
// step), so its stream does not depend on the batch. On CPU (float32) the logits of a row equal
// those computed alone up to float rounding (~1e-6), so the same seed gives the same ids alone or
// in any mix of requests, slots and S; a draw could flip only if its uniform fell within rounding of
// a CDF boundary (greedy: a top-2 tie within rounding). On GPU the same holds for the stream, but
// bf16 and batch-shape-dependent kernels move logits by ~1e-2, so ids agree until the first
// near-tie and are not guaranteed equal across batch compositions.
//
// Threading and ownership: the engine keeps a const reference to the model (no copy: it reads the
// policy's current parameters on every call, under no-grad) and owns its KV cache. The one
// exception is a layout copy: on AVX-512 CPUs each call repacks the LM head's and (for models up
// to EngineOptions::pack_max_bytes) the layers' weights once, and drops them when the call
// returns (or keeps them for the next call with EngineOptions::keep_packed, for a frozen base). One thread at a time; do not change the parameters during generate(). The model must
// outlive the engine.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "rollout/sampling.h"  // SamplingParams

namespace ptk::model {
class Qwen2Model;
class KVCache;
struct PackedDecodeWeights;
}  // namespace ptk::model

namespace ptk::rollout {

struct Request {
  std::vector<int64_t> prompt;  // token ids, at least one
  int64_t samples = 1;          // G: independent samples of this prompt (prefilled once)
  SamplingParams sampling;
  uint64_t seed = 0;            // makes this request's samples reproducible whatever else runs
  int64_t max_new_tokens = 256;
  // Generation stops after any of these ids (it is kept in the output). The caller passes the
  // tokenizer's eos_id() and im_end_id() for Qwen2.5 chat; empty = only max_new_tokens stops.
  std::vector<int64_t> stop_ids;
  // Generation stops after the token whose bytes complete one of these (the token is kept; the
  // match is reported in Sample::stop_string). Needs EngineOptions::token_bytes.
  std::vector<std::string> stop_strings;
  // Optional, one per sample: its own max_new_tokens (benchmarks replaying recorded lengths).
  std::vector<int64_t> sample_max_new_tokens;
};

enum class FinishReason { kStop, kLength };
const char* finish_reason_name(FinishReason r);  // "stop" | "length"

struct Sample {
  std::vector<int64_t> ids;      // generated ids only, including the stop token / stop-string token
  std::vector<float> logprobs;   // per id: log_softmax(logits / T)[id] over all V (T = 1 when greedy)
  FinishReason finish_reason = FinishReason::kLength;
  int64_t stop_id = -1;          // the stop id that ended it, else -1
  std::string stop_string;       // the stop string that ended it, else ""
};

struct EngineOptions {
  // S: sequences decoded together. More = higher throughput until compute-bound; the cache takes
  // S * max_len * layers * 2 * kv_heads * head_dim * dtype bytes.
  int64_t slots = 32;
  // Tokens per slot (prompt + generated). 0 = sized to the longest request of each call.
  int64_t max_len = 0;
  // Columns >= vocab_limit are never sampled: pass the tokenizer's vocab_size() (Qwen2.5: 151665
  // of 151936 rows). 0 = every row of the model.
  int64_t vocab_limit = 0;
  // Bytes each token id decodes to (rollout/token_bytes.h builds it from a tokenizer); needed only
  // by requests with stop_strings.
  std::shared_ptr<const std::vector<std::string>> token_bytes;
  // A prefill batch of prompts of different lengths is formed only while its padded size stays
  // within this factor of its real tokens; other prompts are prefilled alone.
  double prefill_padding_factor = 1.15;
  // Most prompt tokens in one prefill call (memory bound for long prompts).
  int64_t prefill_max_tokens = 8192;
  // On a CPU with AVX-512 (float32 weights): copy the LM head's weight once per generate() call
  // into model::PackedLinear's layout, so decode steps stream it once instead of OpenBLAS repacking
  // it every step (1.2x at 64 rows to 2.7x at 1 row on the LM head). Costs vocab x hidden x 4 bytes
  // for the call (545 MB at Qwen2.5-0.5B). Ignored elsewhere.
  bool pack_lm_head = true;
  // The same for every layer's linears (1.6x at 16 rows to 2.1x at 1 row on Qwen2.5-0.5B's 24
  // layers), while their copy takes at most pack_max_bytes (Qwen2.5-0.5B's: 1.43 GB; 1.5B's, 5.2 GB,
  // is over the default and decodes through at::linear).
  bool pack_trunk = true;
  int64_t pack_max_bytes = int64_t{2} << 30;
  // Keep the packed copies from one generate() call to the next instead of dropping them when the
  // call returns: for a model whose packed weights never change between calls (GRPO with LoRA: the
  // base is frozen, and the adapters, which the layers apply after the packed product, are read
  // live on every call). The caller promises that; drop_packed() frees the copies (the next call
  // packs again). Costs the copies' memory between calls.
  bool keep_packed = false;
  // Where the decode loop runs. kOn: rollout::DeviceLoop (rollout/device_loop.h): every slot's
  // token, position and sampling state in persistent buffers on the model's device, one fixed-shape
  // step over the lowest n slots (n a power of two covering the busy ones), sampling by tensor ops,
  // one host->device copy (admissions' changes) and one device->host copy (ids + log-probs) per
  // step, CUDA graphs (cuda_graphs). kOff: the host loop (ids, positions and sampling parameters
  // built on the host each step; on AVX-512 CPUs the packed weights above, faster there). kAuto: kOn
  // when the model is on CUDA, else kOff. The packed copies are not made with the device loop.
  enum class DeviceLoopMode { kAuto, kOn, kOff };
  DeviceLoopMode device_loop = DeviceLoopMode::kAuto;
  // With the device loop on CUDA: capture each (slot-count, key-length) bucket's decode step once per generate()
  // call as a CUDA graph and replay it (fewer kernel launches; the graphs and their memory pool are
  // released when the call returns). false = eager steps (debugging, profiling). Ignored elsewhere.
  bool cuda_graphs = true;
  // On CUDA: the KV cache takes at most this fraction of the GPU's total memory, less what is in
  // use when it is allocated (weights, optimizer state, LibTorch's live tensors), as vLLM's
  // gpu_memory_utilization; the engine then runs min(slots, what fits) slots (logged) and throws
  // when not even one fits. Each slot counts its KV (max_len positions) plus ~128 bytes per
  // vocabulary entry for the decode step's logits and sampling, and 1 GiB stays free beside the
  // cache (prefill activations, the CUDA graphs' pool). 0 = slots as given, whatever the memory.
  // Ignored on the CPU.
  double gpu_memory_fraction = 0.9;
};

// Where the time of the last generate() went (seconds, wall clock; on GPU the split between
// phases is approximate because kernels run asynchronously until the sampled ids are read).
struct Stats {
  int64_t requests = 0, samples = 0;
  int64_t prompt_tokens = 0;        // prefilled (shared prompts counted once per prefill)
  int64_t prefill_padding = 0;      // padding positions computed in prefill batches
  int64_t generated_tokens = 0;
  int64_t decode_steps = 0;         // forward calls of one token per busy slot
  int64_t decode_rows = 0;          // sum over steps of busy slots
  int64_t prefills = 0, prefix_copies = 0;
  double prefill_s = 0, decode_s = 0, sample_s = 0, bookkeeping_s = 0, total_s = 0;  // device loop: sampling in decode_s
  double pack_s = 0;             // packing weights (EngineOptions::pack_lm_head / pack_trunk), in total_s
  bool packed_lm_head = false;   // whether decode steps used the packed LM head
  bool packed_trunk = false;     // ... and the packed layers
  int64_t packed_bytes = 0;      // what the packed copies held during the call
  bool packed_reused = false;    // EngineOptions::keep_packed: this call used the previous call's copies (pack_s 0)
  int64_t slots = 0;              // S of this call (on CUDA possibly fewer than asked: gpu_memory_fraction)
  bool device_loop = false;       // whether the decode loop ran on the device (EngineOptions::device_loop)
  // Device loop: transfers and CUDA graphs over the call. A step makes one device->host copy and at
  // most one host->device copy (only when slots were admitted or freed since the last step).
  int64_t h2d_copies = 0, d2h_copies = 0;
  int64_t graph_captures = 0, graph_replays = 0;
  double occupancy() const { return decode_steps ? double(decode_rows) / double(decode_steps * slots) : 0.0; }
  double tokens_per_s() const { return total_s > 0 ? generated_tokens / total_s : 0.0; }
};

class Engine {
 public:
  Engine(const model::Qwen2Model& model, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Called after each finished sample: (samples done, samples total, tokens generated so far).
  using ProgressFn = std::function<void(int64_t, int64_t, int64_t)>;

  // Generates every request's samples; result[i][g] is sample g of requests[i]. Throws ptk::Error
  // naming the request for a bad one (empty prompt, ids outside the vocabulary, bad sampling
  // parameters, prompt + max_new_tokens over max_len, stop strings without token_bytes).
  std::vector<std::vector<Sample>> generate(const std::vector<Request>& requests, const ProgressFn& progress = {});

  // Releases the KV cache (between GRPO phases); the next generate() allocates it again.
  void free_cache();
  // Bytes the KV cache holds now (0 when freed).
  size_t cache_bytes() const;
  // Frees the packed weight copies kept by EngineOptions::keep_packed (the next generate() repacks).
  void drop_packed();

  const Stats& last_stats() const { return stats_; }
  const EngineOptions& options() const { return options_; }

 private:
  const model::Qwen2Model& model_;
  EngineOptions options_;
  std::unique_ptr<model::KVCache> cache_;
  std::shared_ptr<const model::PackedDecodeWeights> packed_;  // kept between calls (EngineOptions::keep_packed)
  Stats stats_;
};

}  // namespace ptk::rollout
