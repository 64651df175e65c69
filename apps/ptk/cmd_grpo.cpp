// `ptk grpo --recipe FILE [key.path=value ...]`: online RL with GRPO (rl/grpo_stage.h).
// Not the stage itself: flags, recipe binding, the runtime banner, then run_grpo.
#include <iostream>

#include "apps/ptk/check.h"
#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/runtime/runtime.h"
#include "reward/verifiers.h"
#include "rl/grpo_stage.h"

namespace ptk::app {

int cmd_grpo(int argc, char** argv) {
  rl::GrpoRecipe recipe;
  cli::CommandLine cl("grpo", "ptk grpo --recipe FILE [--check] [key.path=value ...]",
                      "Online RL with GRPO (TRL's definitions): each generation batch samples grpo.num_generations\n"
                      "completions of every prompt with the rollout engine from the policy's own weights, scores\n"
                      "them with rule verifiers (grpo.reward_funcs) against the prompt's `answer`, turns rewards into\n"
                      "group-relative advantages and minimizes the clipped surrogate (+ grpo.beta * KL to the start\n"
                      "model) for grpo.num_iterations optimizer steps. Prompts: JSONL {\"prompt\": text or messages,\n"
                      "\"answer\": \"...\"}. Writes <run.dir>/final (HF folder), metrics.jsonl (TRL metric names),\n"
                      "rollouts/step-N.jsonl, checkpoints/. Rerunning the same recipe resumes (resume=auto);\n"
                      "a finished run says so, and a folder trained with another recipe is refused, naming the keys.");
  cl.accept_recipe(recipe.all_sections());
  cl.accept_chat_template();
  cl.accept_check();
  if (!cl.parse(argc, argv)) return 0;
  auto json = config::load_recipe(cl.recipe(), cl.overrides());
  config::bind_recipe(json, recipe.all_sections(), [&](config::Errors& e) { recipe.cross_check(e); });
  if (cl.check_only()) {
    for (auto& f : recipe.grpo.reward_funcs) reward::find_verifier(f);  // the stage checks them after loading the model
    return finish_check(cl, recipe.model);
  }
  runtime::init_and_announce(cl.threads() > 0 ? cl.threads() : static_cast<int>(recipe.run.threads));
  std::string run_dir = rl::run_grpo(recipe, cl.recipe(), config::resolved_json(recipe.all_sections()));
  std::cout << "grpo: wrote " << run_dir << "/final\n";
  return 0;
}

}  // namespace ptk::app
