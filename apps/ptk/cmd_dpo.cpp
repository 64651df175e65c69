// `ptk dpo --recipe FILE [key.path=value ...]`: offline RL on preference pairs (rl/dpo_stage.h).
// Not the stage itself: flags, recipe binding, the runtime banner, then run_dpo.
#include <iostream>

#include "apps/ptk/check.h"
#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/runtime/runtime.h"
#include "rl/dpo_stage.h"

namespace ptk::app {

int cmd_dpo(int argc, char** argv) {
  rl::DpoRecipe recipe;
  cli::CommandLine cl("dpo", "ptk dpo --recipe FILE [--check] [key.path=value ...]",
                      "Offline RL on preference pairs ({\"prompt\", \"chosen\", \"rejected\"} JSONL, TRL's format):\n"
                      "DPO and its variants (dpo.loss_type sigmoid|hinge|ipo|robust|sft|sigmoid_norm, or a list with\n"
                      "dpo.loss_weights) against a frozen reference (dpo.ref_path, default model.path), whose log-probs\n"
                      "come from a live reference forward each micro-batch or are computed once and cached beside the\n"
                      "prepared data. dpo.precompute_ref_log_probs=auto (default) precomputes when the run covers the\n"
                      "data (planned pairs + eval pairs x evals >= train + eval pairs: about one epoch or more), when a\n"
                      "cache for this reference and data exists, or when a live reference would not fit in memory; else\n"
                      "live (a 20-step run over 10,000 pairs does not pay for a pass over all of them); true|false forces;\n"
                      "or SimPO/CPO (dpo.algorithm=cpo, loss_type simpo|sigmoid|hinge|ipo), which loads no reference.\n"
                      "Losses and metrics (rewards/*, logps/*, logits/*) as TRL's DPOTrainer / CPOTrainer. Starts from\n"
                      "an HF folder (model.path, usually the SFT stage's final/); writes <run.dir>/final as an HF folder,\n"
                      "plus metrics.jsonl, checkpoints/ and config.json. Rerunning the same recipe resumes (resume=auto);\n"
                      "a finished run says so, and a folder trained with another recipe is refused, naming the keys.\n"
                      "train.micro_batch_size counts pairs; data.max_seq_len bounds prompt + the longer reply.");
  cl.accept_recipe(recipe.all_sections());
  cl.accept_chat_template();
  cl.accept_check();
  if (!cl.parse(argc, argv)) return 0;
  auto json = config::load_recipe(cl.recipe(), cl.overrides());
  config::bind_recipe(json, recipe.all_sections());
  if (cl.check_only()) return finish_check(cl, recipe.model);
  runtime::init_and_announce(cl.threads() > 0 ? cl.threads() : static_cast<int>(recipe.run.threads));
  std::string run_dir = rl::run_dpo(recipe, cl.recipe(), config::resolved_json(recipe.all_sections()));
  std::cout << "dpo: wrote " << run_dir << "/final\n";
  return 0;
}

}  // namespace ptk::app
