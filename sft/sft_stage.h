// The SFT stage: next-token NLL on assistant turns (or completions), TRL's definitions, from a
// Hugging Face folder (or a config.json for random init) to a fine-tuned HF folder. Algorithm: pack
// prepared documents into rows, run the model to its final hidden states, score only target tokens
// through the fused lm_head op, normalize by the optimizer step's target count. The loop, resume
// and checkpoints are core/train's; data is datasets/'s. Not DPO/GRPO (rl/).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/config/sections.h"  // TrainingRecipe
#include "core/parallel/comm.h"     // Comm
#include "core/train/trainer.h"     // Stage
#include "eval/eval.h"           // HeldoutOptions

namespace ptk::sft {

// The `sft` recipe section.
struct SftSection : config::Section {
  int64_t eval_micro_batch_size;
  eval::HeldoutOptions heldout;  // sft.eval_prompts, eval_verifier, ...: held-out accuracy
  const char* name() const override { return "sft"; }
  const char* help() const override { return "supervised fine-tuning"; }
  void visit(config::Visitor& v) override;
  void validate(config::Errors& e) const override;
};

struct SftRecipe : config::TrainingRecipe {
  SftSection sft;
  std::vector<config::Section*> all_sections() {
    auto s = sections();
    s.push_back(&sft);
    return s;
  }
};

// The stage `ptk sft` trains (run_sft builds it the same way): the policy on run.device, data prepared
// into run_dir on rank 0 of `comm`. For tests that drive its steps themselves.
std::unique_ptr<train::Stage> make_sft_stage(SftRecipe& recipe, const std::string& run_dir, parallel::Comm& comm);

// Runs the whole stage: prepare (or reuse) data, build/load the model, train with core/train's
// loop, write run_dir/final. `recipe_file` names the run folder when run.dir is empty.
// Returns the run folder.
std::string run_sft(SftRecipe& recipe, const std::string& recipe_file, const std::string& resolved_recipe);

}  // namespace ptk::sft
