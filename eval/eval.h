// Held-out evaluation: greedy (or sampled) generation through the rollout engine on RL-format
// prompts ({"prompt", "answer"}), accuracy through a named rule verifier, mean completion length,
// and mean reward when a reward model is given. `ptk eval` and the stages' periodic evals call this
// one function, and GRPO's rule rewards are the same verifiers. Not a training loop, not a server.
// Threading: one caller at a time per model; the model is read (no-grad), never changed.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rollout/engine.h"    // EngineOptions
#include "rollout/sampling.h"  // SamplingParams

namespace ptk {
class Metrics;
}
namespace ptk::config {
class Visitor;
struct Errors;
}  // namespace ptk::config
namespace ptk::parallel {
class Comm;
}
namespace ptk::model {
class Qwen2Model;
}
namespace ptk::tokenizer {
class Tokenizer;
}

namespace ptk::eval {

struct EvalPrompt {
  std::vector<int64_t> ids;  // the rendered prompt (chat: with the generation prompt)
  std::string text;          // the rendered prompt text, for reports
  std::string answer;        // the reference the verifier checks against
  std::string where;         // "file:line"
};

// Reads RL-format JSONL (a message-list prompt is rendered with the generation prompt; a string
// prompt is encoded as is). Bad lines throw ptk::Error with file:line and the reason. limit 0 = all.
std::vector<EvalPrompt> read_eval_prompts(const std::string& path, const tokenizer::Tokenizer& tok, int64_t limit = 0);

struct EvalOptions {
  std::string verifier = "math";  // reward/verifiers.h name
  int64_t max_new_tokens = 128;
  rollout::SamplingParams sampling{0.0, 1.0, 0};  // temperature 0 = greedy
  int64_t samples = 1;                            // per prompt; accuracy averages over all samples
  uint64_t seed = 0;                              // prompt i samples with seed + i ...
  std::vector<uint64_t> prompt_seeds;             // ... or with prompt_seeds[i] (one per prompt) when given
  int64_t slots = 64;
  // The engine's other options (device loop, CUDA graphs, memory share); slots and vocab_limit are
  // set from the fields above and the tokenizer.
  rollout::EngineOptions engine;
  // A Qwen2ForSequenceClassification model scoring prompt + completion ("" = none).
  const model::Qwen2Model* reward_model = nullptr;
};

struct EvalItem {
  std::string prompt, completion, answer, finish_reason;
  double correct = 0;       // the verifier's reward in [0, 1]
  double reward = 0;        // reward model score (when given)
  int64_t length = 0;       // generated tokens
};

struct EvalResult {
  int64_t prompts = 0, samples = 0;
  double accuracy = 0;            // mean verifier reward over samples
  double mean_length = 0;         // generated tokens per sample
  double mean_reward = 0;         // reward model, when given
  bool has_reward = false;
  double seconds = 0, tokens_per_s = 0;
  std::vector<EvalItem> items;    // prompt-major, `samples` per prompt
};

EvalResult evaluate(const model::Qwen2Model& model, const tokenizer::Tokenizer& tok,
                    const std::vector<EvalPrompt>& prompts, const EvalOptions& options);

// {"accuracy": ..., "mean_length": ..., ..., "items": [...]} (pretty JSON).
std::string result_json(const EvalResult& r, const std::string& model_dir, const std::string& data_path,
                        const EvalOptions& options);

// ---- Periodic held-out accuracy inside a training stage (SFT, DPO) ----

// Keys a stage declares in its own section (`sft.eval_prompts`, `dpo.eval_verifier`, ...).
struct HeldoutOptions {
  std::string prompts;          // RL-format JSONL with `prompt` and `answer`; "" = no held-out accuracy
  std::string verifier;         // reward/verifiers.h name
  int64_t max_new_tokens = 0;   // greedy generation budget
  int64_t max_prompts = 0;      // first N prompts; 0 = all
  bool at_start = false;        // also evaluate before the first step (fresh runs)
  void visit(config::Visitor& v);
  void validate(config::Errors& e, const std::string& section) const;
};

// evaluate() on this rank's share of the prompts (`mine`), its sums all-reduced over the ranks of
// `comm` (null: one rank), so every rank returns the global figures. Every rank must call it, also
// one with no prompts. samples 0: no rank had a prompt.
struct GlobalEval {
  double accuracy = 0, mean_length = 0;
  int64_t samples = 0;
};
GlobalEval evaluate_across_ranks(const model::Qwen2Model& model, const tokenizer::Tokenizer& tok,
                                 const std::vector<EvalPrompt>& mine, const EvalOptions& options, parallel::Comm* comm);

// Writes run_dir/eval_start.json: the held-out figures measured before the first step, each under
// the name metrics.jsonl gives it (eval/<key>), at step 0.
void write_eval_start(const std::string& run_dir, const Metrics& figures);

// Greedy generation through the rollout engine on held-out prompts, scored by a verifier: the
// same code as `ptk eval`. With several ranks each evaluates every world-th prompt
// (evaluate_across_ranks), so every rank returns the global figures.
class Heldout {
 public:
  Heldout() = default;
  // Reads the prompts now (bad lines throw with file:line); disabled when options.prompts is "".
  Heldout(const HeldoutOptions& options, std::shared_ptr<const tokenizer::Tokenizer> tok);
  bool enabled() const { return !prompts_.empty(); }
  // Adds "accuracy" (mean verifier reward) and "completions/mean_length" (tokens) to `out`.
  void run(const model::Qwen2Model& model, Metrics* out, parallel::Comm* comm) const;
  // When options.at_start and the run is fresh: runs, logs "<stage>: before training, held-out
  // accuracy ..." and writes run_dir/eval_start.json (rank 0).
  void run_at_start(const model::Qwen2Model& model, parallel::Comm* comm, bool fresh, const std::string& run_dir,
                    const std::string& stage) const;

 private:
  HeldoutOptions options_;
  std::shared_ptr<const tokenizer::Tokenizer> tok_;
  std::vector<EvalPrompt> prompts_;
};

}  // namespace ptk::eval
