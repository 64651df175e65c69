// `ptk sft --recipe FILE [key.path=value ...]`: supervised fine-tuning (sft/sft_stage.h).
// Not the stage itself: flags, recipe binding, the runtime banner, then run_sft.
#include <iostream>

#include "apps/ptk/check.h"
#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/runtime/runtime.h"
#include "sft/sft_stage.h"

namespace ptk::app {

int cmd_sft(int argc, char** argv) {
  sft::SftRecipe recipe;
  cli::CommandLine cl("sft", "ptk sft --recipe FILE [--check] [key.path=value ...]",
                      "Supervised fine-tuning: loss on assistant turns (chat data) or completions (prompt/completion\n"
                      "data), TRL's token-mean over the optimizer step. Reads an HF folder (model.path) or a\n"
                      "config.json (model.config, random init); writes <run.dir>/final as an HF folder, plus\n"
                      "metrics.jsonl, checkpoints/ and config.json. Rerunning the same recipe resumes (resume=auto);\n"
                      "a finished run says so, and a folder trained with another recipe is refused, naming the keys.");
  cl.accept_recipe(recipe.all_sections());
  cl.accept_chat_template();
  cl.accept_check();
  if (!cl.parse(argc, argv)) return 0;
  auto json = config::load_recipe(cl.recipe(), cl.overrides());
  config::bind_recipe(json, recipe.all_sections());
  if (cl.check_only()) return finish_check(cl, recipe.model);
  runtime::init_and_announce(cl.threads() > 0 ? cl.threads() : static_cast<int>(recipe.run.threads));
  std::string run_dir = sft::run_sft(recipe, cl.recipe(), config::resolved_json(recipe.all_sections()));
  std::cout << "sft: wrote " << run_dir << "/final\n";
  return 0;
}

}  // namespace ptk::app
