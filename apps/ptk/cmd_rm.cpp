// `ptk rm --recipe FILE [key.path=value ...]`: reward-model training (reward/rm_stage.h).
// Not the stage itself: flags, recipe binding, the runtime banner, then run_rm.
#include <iostream>

#include "apps/ptk/check.h"
#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/runtime/runtime.h"
#include "reward/rm_stage.h"

namespace ptk::app {

int cmd_rm(int argc, char** argv) {
  reward::RmRecipe recipe;
  cli::CommandLine cl("rm", "ptk rm --recipe FILE [--check] [key.path=value ...]",
                      "Reward-model training, TRL's RewardTrainer: Bradley-Terry loss -logsig(r+ - r- - margin)\n"
                      "(+ rm.center_rewards_coefficient * mean((r+ + r-)^2)) on preference pairs, the score read at\n"
                      "each row's last non-pad token. Starts from an SFT folder (model.path; a score head is added)\n"
                      "or a config (model.config); writes <run.dir>/final in HF Qwen2ForSequenceClassification\n"
                      "layout, plus metrics.jsonl (accuracy, margin, min/mean/max_reward), checkpoints/ and\n"
                      "config.json. Rerunning the same recipe resumes (resume=auto);\n"
                      "a finished run says so, and a folder trained with another recipe is refused, naming the keys.");
  cl.accept_recipe(recipe.all_sections());
  cl.accept_chat_template();
  cl.accept_check();
  if (!cl.parse(argc, argv)) return 0;
  auto json = config::load_recipe(cl.recipe(), cl.overrides());
  config::bind_recipe(json, recipe.all_sections());
  if (cl.check_only()) return finish_check(cl, recipe.model);
  runtime::init_and_announce(cl.threads() > 0 ? cl.threads() : static_cast<int>(recipe.run.threads));
  std::string run_dir = reward::run_rm(recipe, cl.recipe(), config::resolved_json(recipe.all_sections()));
  std::cout << "rm: wrote " << run_dir << "/final\n";
  return 0;
}

}  // namespace ptk::app
