// `ptk pipeline --recipe FILE [key.path=value ...]`: SFT -> DPO -> RM -> GRPO (any subset, any
// order) from one recipe, each stage a child process of this binary (pipeline/pipeline.h).
// Not the orchestration itself: flags, then run_pipeline.
#include "apps/ptk/cli.h"
#include "apps/ptk/commands.h"
#include "pipeline/child_process.h"
#include "pipeline/pipeline.h"

namespace ptk::app {

int cmd_pipeline(int argc, char** argv) {
  cli::CommandLine cl(
      "pipeline", "ptk pipeline --recipe FILE [--dry-run] [--threads N] [key.path=value ...]",
      "Runs the stages a pipeline recipe lists (sft, dpo, rm, grpo; any subset and order), each as a child\n"
      "process of this ptk: a policy stage's <run.dir>/<stage>/final becomes the next stage's model.path\n"
      "(rm's feeds the reward server instead; \"model_from\": \"<stage>\" or \"<stage>@step-N\" picks another\n"
      "stage's final/ or one of its kept checkpoints); a grpo stage's reward server is started on a free\n"
      "loopback port and stopped after it (or reached at a URL). Finished stages are skipped on a rerun; an\n"
      "interrupted one resumes from its checkpoint. Prints held-out accuracy after each stage (`ptk eval`)\n"
      "and a summary table (also <run.dir>/summary.md). SIGINT/SIGTERM are forwarded to the stage.\n"
      "The recipe's top-level \"overrides\" apply to every stage before its own, e.g. LoRA in every stage:\n"
      "  ptk pipeline --recipe recipes/tiny/pipeline.json overrides.model.lora.enabled=true\n"
      "(each stage's final/ is then a PEFT adapter folder; the next stage loads it merged onto its base).\n"
      "Recipe format: pipeline/pipeline.h; example: recipes/tiny/pipeline.json. Exit status: 0 done,\n"
      "1 a stage failed (2: its command refused its recipe or flags), 128+N after signal N.");
  cl.flags().add_options()("dry-run", "print the stages and what each would do (run, resume, skip) and check each stage's "
                           "recipe and overrides with `ptk <command> --check`; train nothing");
  cl.accept_recipe({});
  if (!cl.parse(argc, argv)) return 0;
  pipeline::PipelineOptions o;
  o.ptk = proc::self_exe();
  o.threads = cl.threads();
  o.dry_run = cl.vm().count("dry-run") > 0;
  return pipeline::run_pipeline(cl.recipe(), cl.overrides(), o);
}

}  // namespace ptk::app
