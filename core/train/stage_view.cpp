#include "core/train/stage_view.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "core/util/strings.h"

namespace ptk::train {
namespace {

bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
std::string strip_eval(const std::string& name) { return name.rfind("eval/", 0) == 0 ? name.substr(5) : name; }

// 12345.6 -> "12,346"
std::string with_commas(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.0f", std::fabs(v));
  std::string digits = b, out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return (v < 0 ? "-" : "") + out;
}

// The label a metric gets on screen: its metrics.jsonl name, except the loop's throughput and MFU.
std::string screen_name(const std::string& name) {
  if (name == "mfu") return "MFU";
  if (name == "learning_rate") return "lr";
  return name;
}

// The value of `name` in `m`; false when absent.
bool find(const Metrics& m, const std::string& name, double* v) {
  for (auto& [k, x] : m.values())
    if (k == name) {
      *v = x;
      return true;
    }
  return false;
}

std::string pair_text(const std::string& name, double v) {
  Unit u = unit_of(name);
  if (name == "tokens_per_s") return format_value(v, u);  // "12,345 tok/s" names itself
  return screen_name(name) + " " + format_value(v, u);
}

// Row i of metric `name` in a MetricsLog; NaN when absent.
double log_value(const plot::MetricsLog& log, const std::string& name, size_t i) {
  auto it = log.values.find(name);
  if (it == log.values.end() || i >= it->second.size()) return std::nan("");
  return it->second[i];
}

bool log_has(const plot::MetricsLog& log, const std::string& name) {
  auto it = log.values.find(name);
  if (it == log.values.end()) return false;
  for (double v : it->second)
    if (std::isfinite(v)) return true;
  return false;
}

// The eval metric names (with "eval/") present in the log: the view's first, then the others.
std::vector<std::string> eval_names(const StageView& view, const plot::MetricsLog& log, const Metrics& before) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  auto add = [&](const std::string& n) {
    if (seen.insert(n).second) out.push_back(n);
  };
  for (auto& n : view.eval)
    if (log_has(log, "eval/" + n)) add("eval/" + n);
  for (auto& n : log.names)
    if (n.rfind("eval/", 0) == 0 && log_has(log, n)) add(n);
  for (auto& [n, v] : before.values())
    if (n.rfind("eval/", 0) == 0) add(n);
  return out;
}

// Rows of the log where any eval metric is present.
std::vector<size_t> eval_rows(const plot::MetricsLog& log, const std::vector<std::string>& names) {
  std::vector<size_t> rows;
  for (size_t i = 0; i < log.steps.size(); ++i)
    for (auto& n : names)
      if (std::isfinite(log_value(log, n, i))) {
        rows.push_back(i);
        break;
      }
  return rows;
}

struct Best {
  double value = std::nan("");
  int64_t step = -1;
};

Best best_of(const plot::MetricsLog& log, const std::string& name, const std::vector<size_t>& rows) {
  Best b;
  int dir = better_direction(name);
  for (size_t i : rows) {
    double v = log_value(log, name, i);
    if (!std::isfinite(v)) continue;
    if (b.step < 0 || (dir > 0 ? v > b.value : v < b.value)) {
      b.value = v;
      b.step = log.steps[i];
    }
  }
  return b;
}

std::string md_cell(double v, const std::string& name) { return std::isfinite(v) ? format_value(v, unit_of(name)) : ""; }

}  // namespace

Unit unit_of(const std::string& full) {
  const std::string n = strip_eval(full);
  if (n == "tokens_per_s" || ends_with(n, "/tokens_per_s")) return Unit::kRate;
  if (n == "lr" || n == "learning_rate") return Unit::kLr;
  if (n == "mfu" || has(n, "accurac") || has(n, "ratio") || n.rfind("frac_", 0) == 0 || has(n, "/frac_") ||
      ends_with(n, "_fraction"))
    return Unit::kPercent;
  if (has(n, "length")) return Unit::kTokens;
  if (n == "kl" || ends_with(n, "/kl")) return Unit::kNats;
  if (ends_with(n, "_s") || n.rfind("time/", 0) == 0) return Unit::kSeconds;
  return Unit::kPlain;
}

std::string format_value(double v, Unit u) {
  if (!std::isfinite(v)) return "n/a";
  char b[64];
  switch (u) {
    case Unit::kPercent:
      std::snprintf(b, sizeof b, std::fabs(v) < 0.001 && v != 0 ? "%.3g%%" : "%.1f%%", 100.0 * v);
      return b;
    case Unit::kTokens:
      std::snprintf(b, sizeof b, "%.1f tok", v);
      return b;
    case Unit::kNats:
      std::snprintf(b, sizeof b, "%.4g nats", v);
      return b;
    case Unit::kRate:
      return with_commas(v) + " tok/s";
    case Unit::kLr:
      std::snprintf(b, sizeof b, "%.2e", v);
      return b;
    case Unit::kSeconds:
      return format_duration(v);
    case Unit::kPlain:
    default:
      std::snprintf(b, sizeof b, "%.4g", v);
      return b;
  }
}

int better_direction(const std::string& full) {
  const std::string n = strip_eval(full);
  if (has(n, "loss")) return -1;
  if (has(n, "accurac") || n == "reward" || n == "margin" || n == "rewards/margins" || n == "mean_reward")
    return +1;
  return 0;
}

StageView stage_view(const std::string& stage) {
  StageView v;
  v.stage = stage;
  const std::vector<std::string> loop_plots = {"learning_rate", "grad_norm", "tokens_per_s"};
  if (stage == "sft") {
    v.progress = {"loss", "mean_token_accuracy", "entropy"};
    v.eval = {"loss", "mean_token_accuracy", "entropy", "accuracy", "completions/mean_length"};
    v.plots = {"loss", "eval/loss", "mean_token_accuracy", "eval/mean_token_accuracy", "eval/accuracy", "entropy"};
    v.table = {"loss", "mean_token_accuracy", "entropy", "learning_rate", "grad_norm", "tokens_per_s"};
  } else if (stage == "dpo") {
    v.progress = {"loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"};
    v.eval = {"loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "accuracy",
              "completions/mean_length"};
    v.plots = {"loss",          "eval/loss",          "rewards/accuracies", "eval/rewards/accuracies",
               "rewards/margins", "eval/rewards/margins", "rewards/chosen",     "rewards/rejected",
               "logps/chosen",  "logps/rejected",     "nll_loss",           "eval/accuracy"};
    v.table = {"loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
               "learning_rate", "grad_norm"};
  } else if (stage == "rm") {
    v.progress = {"loss", "accuracy", "margin"};
    v.eval = {"loss", "accuracy", "margin", "mean_reward"};
    v.plots = {"loss", "eval/loss", "accuracy", "eval/accuracy", "margin", "eval/margin"};
    v.table = {"loss", "accuracy", "margin", "learning_rate", "grad_norm", "tokens_per_s"};
  } else if (stage == "grpo") {
    // The phases of a step (rollout, its scoring, the reference pass, the update) close the line.
    v.progress = {"reward", "reward_std", "kl", "clip_ratio/region_mean", "entropy", "completions/mean_length",
                  "time/generate_s", "time/score_s", "time/reference_s", "time/update_s"};
    v.eval = {"accuracy", "sampled_accuracy", "completions/mean_length"};
    v.plots = {"reward",         "reward_std", "eval/accuracy", "eval/sampled_accuracy",
               "kl",             "entropy",    "clip_ratio/region_mean", "completions/mean_length",
               "frac_reward_zero_std", "loss", "generation/tokens_per_s"};
    v.table = {"reward", "reward_std", "kl", "clip_ratio/region_mean", "completions/mean_length", "loss",
               "learning_rate", "grad_norm"};
  } else {
    v.progress = {"loss"};
    v.eval = {"loss"};
    v.plots = {"loss", "eval/loss", "mean_token_accuracy", "eval/mean_token_accuracy", "entropy"};
    v.table = {"loss", "learning_rate", "grad_norm", "tokens_per_s"};
  }
  for (auto& p : loop_plots) v.plots.push_back(p);
  return v;
}

std::string progress_metrics(const StageView& view, const Metrics& m) {
  std::string s;
  auto add = [&](const std::string& name) {
    double v;
    if (!find(m, name, &v)) return;
    s += (s.empty() ? "" : " | ") + pair_text(name, v);
  };
  for (auto& n : view.progress) add(n);
  for (const char* n : {"learning_rate", "grad_norm", "tokens_per_s", "mfu"}) add(n);
  return s;
}

std::string eval_metrics_text(const StageView& view, const Metrics& m) {
  std::string s;
  std::set<std::string> done;
  auto add = [&](const std::string& key, double v) {
    const std::string name = strip_eval(key);
    if (!done.insert(name).second) return;
    s += (s.empty() ? "" : " | ") + pair_text(name, v);
  };
  for (auto& n : view.eval)
    for (auto& [k, v] : m.values())
      if (strip_eval(k) == n) add(k, v);
  if (!s.empty()) return s;  // the rest are in metrics.jsonl and report.md's eval table
  for (auto& [k, v] : m.values()) add(k, v);
  return s;
}

std::string eval_line(const std::string& label, int64_t step, int64_t total, const StageView& view,
                      const Metrics& eval, double seconds) {
  std::string text = eval_metrics_text(view, eval);
  return label + " eval at step " + std::to_string(step) + "/" + std::to_string(total) + ": " +
         (text.empty() ? "(no eval metrics: the recipe has no data.eval)" : text) + " (" + format_duration(seconds) +
         ")";
}

Metrics read_eval_start(const std::string& run_dir) {
  Metrics m;
  const std::string p = run_dir + "/eval_start.json";
  if (!path_exists(p)) return m;
  rapidjson::Document d;
  if (!json::parse_into(d, read_file(p)).ok() || !d.IsObject()) return m;
  for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
    std::string k = it->name.GetString();
    if (k != "step" && it->value.IsNumber()) m.add(k, it->value.GetDouble());
  }
  return m;
}

std::string run_summary(const RunFacts& f, const StageView& view, const plot::MetricsLog& log, const Metrics& before) {
  std::string s = f.label + " finished: step " + std::to_string(f.step) + "/" + std::to_string(f.total_steps) + " in " +
                  format_duration(f.wall_s);
  if (f.start_step > 0) s += " (this process: steps " + std::to_string(f.start_step) + " -> " + std::to_string(f.step) + ")";
  const size_t n = log.steps.size();
  if (n > 0) {
    double tokens = log_value(log, "num_tokens", n - 1);
    double step_s = 0;
    if (auto it = log.values.find("step_time_s"); it != log.values.end())
      for (double v : it->second)
        if (std::isfinite(v)) step_s += v;
    if (std::isfinite(tokens)) {
      s += "; " + with_commas(tokens) + " tokens trained";
      if (step_s > 0) s += " (" + format_value(tokens / step_s, Unit::kRate) + " over " + format_duration(step_s) + " of steps)";
    }
    // The last step's key metrics.
    Metrics last;
    for (auto& name : view.progress) {
      double v = log_value(log, name, n - 1);
      if (std::isfinite(v)) last.add(name, v);
    }
    if (!last.values().empty())
      s += "\n  last step (" + std::to_string(log.steps[n - 1]) + "): " + progress_metrics(StageView{"", view.progress, {}, {}, {}}, last);
  }
  std::vector<std::string> names = eval_names(view, log, before);
  std::vector<size_t> rows = eval_rows(log, names);
  if (!before.values().empty()) s += "\n  before training: " + eval_metrics_text(view, before);
  if (!rows.empty()) {
    size_t i = rows.back();
    Metrics e;
    for (auto& name : names) {
      double v = log_value(log, name, i);
      if (std::isfinite(v)) e.add(name, v);
    }
    s += "\n  last eval (step " + std::to_string(log.steps[i]) + "): " + eval_metrics_text(view, e);
    if (rows.size() > 1) {
      std::string best;
      for (auto& name : names) {
        if (better_direction(name) == 0) continue;
        Best b = best_of(log, name, rows);
        if (b.step < 0) continue;
        best += (best.empty() ? "" : " | ") + pair_text(strip_eval(name), b.value) + " at step " + std::to_string(b.step);
      }
      if (!best.empty()) s += "\n  best eval: " + best;
    }
  }
  s += "\n  final model: " + f.run_dir + "/final";
  s += "\n  report: " + f.run_dir + "/report.md; metrics: " + f.run_dir + "/metrics.jsonl";
  if (f.tensorboard) s += "\n  TensorBoard: tensorboard --logdir " + f.run_dir + "/tb";
  return s;
}

std::string stage_report(const RunFacts& f, const StageView& view, const plot::MetricsLog& log, const Metrics& before,
                         const std::vector<std::string>& extra_plots, int max_rows) {
  std::string md = "# " + f.label + " run: " + f.run_dir + "\n\n";
  md += "- steps: " + std::to_string(f.step) + " of " + std::to_string(f.total_steps) + "\n";
  md += "- final model: `final/` (Hugging Face folder)\n- metrics: `metrics.jsonl`; recipe: `config.json`";
  if (f.tensorboard) md += "; TensorBoard: `tb/` (`tensorboard --logdir " + f.run_dir + "/tb`)";
  md += "\n\n## Summary\n\n```\n" + run_summary(f, view, log, before) + "\n```\n\n";

  // Eval results: one row per eval.
  std::vector<std::string> names = eval_names(view, log, before);
  std::vector<size_t> rows = eval_rows(log, names);
  if (!names.empty() && (!rows.empty() || !before.values().empty())) {
    md += "## Eval results\n\n| step |";
    std::string sep = "| ---: |";
    for (auto& n : names) {
      md += " " + n + " |";
      sep += " ---: |";
    }
    md += "\n" + sep + "\n";
    if (!before.values().empty()) {
      md += "| 0 (before training) |";
      for (auto& n : names) {
        double v;
        md += " " + (find(before, n, &v) ? md_cell(v, n) : std::string()) + " |";
      }
      md += "\n";
    }
    for (size_t i : rows) {
      md += "| " + std::to_string(log.steps[i]) + " |";
      for (auto& n : names) md += " " + md_cell(log_value(log, n, i), n) + " |";
      md += "\n";
    }
    md += "\n";
  }

  // Training metrics every N steps.
  std::vector<std::string> cols;
  for (auto& c : view.table)
    if (log_has(log, c)) cols.push_back(c);
  if (!cols.empty() && !log.steps.empty()) {
    const int64_t first = log.steps.front(), last = log.steps.back();
    int64_t every = std::max<int64_t>(1, (last - first + max_rows - 1) / std::max(1, max_rows));
    // Round to 1, 2, 5 x 10^k so the steps read well.
    int64_t nice = 1;
    while (nice < every) {
      if (nice * 2 >= every) { nice *= 2; break; }
      if (nice * 5 >= every) { nice *= 5; break; }
      nice *= 10;
    }
    every = nice;
    md += "## Training metrics (every " + std::to_string(every) + " step" + (every == 1 ? "" : "s") +
          ", and the last)\n\n| step |";
    std::string sep = "| ---: |";
    for (auto& c : cols) {
      md += " " + c + " |";
      sep += " ---: |";
    }
    md += "\n" + sep + "\n";
    for (size_t i = 0; i < log.steps.size(); ++i) {
      const int64_t st = log.steps[i];
      if (st % every != 0 && i + 1 != log.steps.size()) continue;
      md += "| " + std::to_string(st) + " |";
      for (auto& c : cols) md += " " + md_cell(log_value(log, c, i), c) + " |";
      md += "\n";
    }
    md += "\n";
  }

  md += "## Curves\n\n";
  std::vector<std::string> plots = view.plots;
  // GRPO's reward functions by name (rewards/<name>/mean), as many as the recipe has.
  if (view.stage == "grpo")
    for (auto& n : log.names)
      if (n.rfind("rewards/", 0) == 0 && ends_with(n, "/mean")) plots.push_back(n);
  for (auto& e : extra_plots)
    if (std::find(plots.begin(), plots.end(), e) == plots.end()) plots.push_back(e);
  md += plot::write_report_plots(f.run_dir, plots);
  return md;
}

}  // namespace ptk::train
