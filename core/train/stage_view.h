// What a training stage shows a person: which of its metrics go into the progress line, the eval
// line and report.md, and how each value is written (units: % for ratios, tok for lengths, nats for
// KL, tok/s for rates). Text only: the step loop (trainer.cpp) prints it, `report.md` embeds it.
// No LibTorch, no state: safe from any thread.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/train/metrics.h"  // Metrics
#include "core/train/plot.h"     // MetricsLog

namespace ptk::train {

enum class Unit {
  kPlain,    // 4 significant digits ("0.6931", "1.2e-05")
  kPercent,  // a fraction shown as a percentage ("62.5%")
  kTokens,   // a length in tokens ("18.2 tok")
  kNats,     // a KL or log-ratio in nats ("0.0012 nats")
  kRate,     // tokens per second ("12,345 tok/s")
  kLr,       // a learning rate ("3.00e-04")
  kSeconds,  // a duration ("1.5s", "2m30s")
};

// The unit a metric name is shown in: rates (tokens_per_s) in tok/s, ratios (accuracy, accuracies,
// *ratio*, frac_*, mfu) in %, lengths in tok, kl in nats, learning rates as 3.00e-04, times (*_s) in
// seconds; anything else plain. Applies to "eval/<name>" as to "<name>".
Unit unit_of(const std::string& name);
// One value in its unit; NaN/Inf as "n/a".
std::string format_value(double value, Unit unit);
// Whether a larger value of `name` is better (+1: accuracy, reward, margins), smaller (-1: loss),
// or neither (0): what "best eval" means in the summary.
int better_direction(const std::string& name);

struct StageView {
  std::string stage;                  // "sft", "dpo", "rm", "grpo"; "" for any other label
  std::vector<std::string> progress;  // training metrics on the progress line, in order (absent ones skipped)
  std::vector<std::string> eval;      // eval metrics (without "eval/") listed first, in order; the rest follow
  std::vector<std::string> plots;     // metrics.jsonl names plotted in report.md
  std::vector<std::string> table;     // columns of report.md's table of training metrics
};

// The view of a stage by its trainer label; an unknown label gets the loop's own metrics (loss,
// learning rate, gradient norm, throughput).
StageView stage_view(const std::string& stage);

// "loss 0.6931 | rewards/accuracies 62.5% | ... | lr 1.00e-04 | grad_norm 0.532 | 12,345 tok/s | MFU 3.1%":
// the view's metrics present in `m`, then the loop's (lr, grad_norm, tokens_per_s, mfu).
std::string progress_metrics(const StageView& view, const Metrics& m);

// "name value | name value ..." of `m`'s values (names without "eval/"): the view's eval metrics in
// order; all of `m`'s, in its order, when it has none of them.
std::string eval_metrics_text(const StageView& view, const Metrics& m);

// The line printed when an eval ran: "sft eval at step 500/2000: loss 0.0005 | ... (12.3s)".
std::string eval_line(const std::string& label, int64_t step, int64_t total_steps, const StageView& view,
                      const Metrics& eval, double seconds);

// What a finished run reports, from its metrics.jsonl (all processes of a resumed run) and this
// process's own timing.
struct RunFacts {
  std::string label, run_dir;
  int64_t step = 0, total_steps = 0, start_step = 0;  // start_step: where this process began (resume)
  double wall_s = 0;                                   // this process, from start to final/ written
  bool tensorboard = false;                            // run_dir/tb holds event files
};

// The end-of-run summary (several lines, no trailing newline): steps, wall time, tokens, the last
// step's key metrics, the last eval, the best eval of each eval metric with a direction, the
// held-out figures before training (eval_start.json), and where final/, report.md, metrics.jsonl and
// the TensorBoard files are.
std::string run_summary(const RunFacts& facts, const StageView& view, const plot::MetricsLog& log,
                        const Metrics& before_training);

// report.md of a stage: what ran, the summary, a table of eval results (one row per eval, "before
// training" first when eval_start.json has one), a table of the view's training metrics every N
// steps (N chosen for about `rows` rows, the last step always included), and the view's curves
// (plots/<metric>.svg; GRPO adds each reward function's rewards/<name>/mean). `extra_plots` are added
// to the view's. Writes the SVGs; returns the markdown.
std::string stage_report(const RunFacts& facts, const StageView& view, const plot::MetricsLog& log,
                         const Metrics& before_training, const std::vector<std::string>& extra_plots, int rows = 20);

// run_dir/eval_start.json's figures (eval/<name> keys); empty when there is none or it cannot be read.
Metrics read_eval_start(const std::string& run_dir);

}  // namespace ptk::train
