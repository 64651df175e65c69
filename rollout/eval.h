// Held-out evaluation: greedy (or sampled) generation through the rollout engine on RL-format
// prompts ({"prompt", "answer"}), accuracy through a named rule verifier, mean completion length,
// and mean reward when a reward model is given. `ptk eval` and the stages' periodic evals call this
// one function, and GRPO's rule rewards are the same verifiers. Not a training loop, not a server.
// Threading: one caller at a time per model; the model is read (no-grad), never changed.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "rollout/sampling.h"  // SamplingParams

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
  uint64_t seed = 0;
  int64_t slots = 64;
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

}  // namespace ptk::eval
