// What the GRPO stage tests share (grpo_stage_test, grpo_lora_test, grpo_invariants_test): their
// training prompts, a recipe bound from a file, a reward with spread on random text, the trainer
// options they run with, and per-token log-probs and entropies recomputed the plain way from full
// logits. Test code only.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/config/recipe.h"

#include "core/model/qwen2.h"
#include "core/train/from_recipe.h"
#include "rl/grpo_stage.h"

namespace ptk::rl::test_support {

// JSONL of 12 chat prompts "What is i + 1?" with answer i + 1 (i = 0..11).
inline std::string what_is_prompts() {
  std::string out;
  for (int i = 0; i < 12; ++i)
    out += "{\"prompt\": [{\"role\": \"user\", \"content\": \"What is " + std::to_string(i) + " + 1?\"}], "
           "\"answer\": \"" + std::to_string(i + 1) + "\"}\n";
  return out;
}

// The GRPO recipe in `file` with `overrides` applied (key=value, as on the command line).
inline std::unique_ptr<GrpoRecipe> bind_recipe(const std::string& file, const std::vector<std::string>& overrides) {
  auto r = std::make_unique<GrpoRecipe>();
  config::bind_recipe(config::load_recipe(file, overrides), r->all_sections());
  return r;
}

// A reward with spread on random text: the share of ASCII letters in the completion.
inline std::vector<RewardFunction> letters() {
  return {{"letters", [](const std::string& c, const std::string&) {
             if (c.empty()) return 0.0;
             double n = 0;
             for (unsigned char ch : c) n += (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
             return n / static_cast<double>(c.size());
           }}};
}

inline train::TrainerOptions options_for(GrpoRecipe& r) {
  auto o = train::trainer_options(r, r.run.dir, "{}\n", "test");
  o.peak_flops = 1e10;
  return o;
}

// ℓ and H recomputed the plain way: full (B, L, V) logits / T, log_softmax, gathered per token (0 at
// padding), float32.
inline std::pair<at::Tensor, at::Tensor> plain_logprobs(const model::Qwen2Model& m, const GrpoLossInputs& in, double T) {
  torch::NoGradGuard ng;
  model::ForwardInput fi;
  fi.input_ids = in.input_ids;
  fi.attention_mask = in.attention_mask;
  auto logits = m.forward(fi).logits.to(torch::kFloat64) / T;  // (B, L, V)
  auto lsm = torch::log_softmax(logits, -1);
  const int64_t B = in.completion_ids.size(0), Tc = in.completion_ids.size(1);
  auto lp = torch::zeros({B, Tc}, torch::kFloat64), ent = torch::zeros({B, Tc}, torch::kFloat64);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lc = in.attention_mask[b].sum().item<int64_t>() - in.prompt_lengths[b];
    for (int64_t t = 0; t < lc; ++t) {
      int64_t pos = in.prompt_lengths[b] - 1 + t;  // logits at pos score token pos + 1
      auto row = lsm[b][pos];
      lp[b][t] = row[in.completion_ids[b][t].item<int64_t>()];
      ent[b][t] = -(row.exp() * row).sum();
    }
  }
  return {lp.to(torch::kFloat32), ent.to(torch::kFloat32)};
}

}  // namespace ptk::rl::test_support
