// `ptk pipeline`: runs the stages one recipe lists (any subset and order of sft, dpo, rm, grpo) as
// child processes of the same ptk binary, chaining each policy stage's final/ into the next stage's
// model.path, starting (and stopping) the reward server a GRPO stage needs, skipping finished
// stages, and printing held-out accuracy after each stage plus a summary table. Not a stage: the
// children train, checkpoint and resume themselves; not a scheduler across machines.
//
// Recipe (JSON with comments, `base` and key=value overrides like every recipe):
//   "run":   {"dir": "runs/<file name>"}           each stage writes <run.dir>/<stage name>/
//   "setup": [{"ptk": ["make-data", ...], "creates": "data/arith/rl_eval.jsonl"}]   skipped when `creates` exists
//   "eval":  {"data": "...rl_eval.jsonl", "verifier": "math", "max_new_tokens": 0, "limit": 0}
//   "overrides": {"model.lora.enabled": true}     every stage's recipe overrides, before the stage's own
//                                                 (on the command line: overrides.model.lora.enabled=true)
//   "stages": [{"name": "sft", "command": "sft|dpo|rm|grpo", "recipe": "sft.json", "overrides": {...},
//               "model_from": "<stage>" (its final/) or "<stage>@step-N" (its checkpoints/step-N), "eval": true,
//               "reward_server": {"recipe": "...", "overrides": {...}, "model_from": "<rm stage>",
//                                 "url": "http://...", "url_key": "grpo.reward_urls", "threads": 0,
//                                 "start_timeout_s": 300}}]
#pragma once
#include <string>
#include <vector>

namespace ptk::pipeline {

struct PipelineOptions {
  std::string ptk;           // the ptk binary the stages run (proc::self_exe())
  int threads = 0;           // --threads for every child; 0 = theirs
  bool dry_run = false;      // print the plan and each stage's state, check each stage's recipe, train nothing
};

// Returns the exit status: 0 all stages done, 1 a stage failed (--dry-run: a stage's recipe failed
// its --check; 2 when its command refused its recipe or flags), 128+N after signal N. Throws
// ptk::Error for recipe problems (every one, with file and key).
int run_pipeline(const std::string& recipe_file, const std::vector<std::string>& overrides,
                 const PipelineOptions& options);

}  // namespace ptk::pipeline
