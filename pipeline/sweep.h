// `ptk sweep`: one base recipe of one stage run under a grid (cartesian product) and/or a list of
// overrides, one after another or N at a time with the cores split, each run a child process in
// <run.dir>/<run name>/; then a comparison table (sweep.md and sweep.csv: each run's overrides, its
// final metrics and held-out accuracy) and overlaid curves (plots/<metric>.svg). Finished runs are
// skipped on a rerun and an interrupted one resumes from its checkpoint. Not a hyperparameter
// search (no early stopping, no Bayesian anything).
//
// Recipe (JSON with comments, `base` and key=value overrides like every recipe):
//   "command": "sft|dpo|rm|grpo", "recipe": "../tiny/sft.json",   (relative to this file, like `base`)
//   "overrides": {"train.max_steps": 100},                        every run
//   "grid": {"optim.lr": [1e-3, 3e-3], "optim.warmup_steps": [0, 20]},
//   "runs": [{"optim.lr": 1e-3}, ...],                            each entry x the grid
//   "parallel": 1, "metrics": ["loss", ...], "eval": {...as in pipelines}, "run": {"dir": ...}
#pragma once
#include <string>
#include <vector>

namespace ptk::pipeline {

struct SweepOptions {
  std::string ptk;       // the ptk binary (proc::self_exe())
  int threads = 0;       // --threads per run; 0 = usable cores / parallel
  int parallel = 0;      // runs at a time; 0 = the recipe's `parallel`
  bool dry_run = false;  // list the runs and their states and check their recipes (--check); train nothing
  bool report_only = false;  // rewrite the table and plots from what is there; run nothing
};

// Returns 0 when every run finished (--dry-run: every run's recipe passed --check), 1 when one
// failed, 128+N after signal N. Throws ptk::Error for recipe problems (every one, with file and key).
int run_sweep(const std::string& recipe_file, const std::vector<std::string>& overrides, const SweepOptions& options);

}  // namespace ptk::pipeline
