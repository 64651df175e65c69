#include "pipeline/sweep.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <set>

#include "core/config/recipe.h"
#include "core/config/sections.h"  // default_run_dir
#include "core/train/plot.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "core/util/strings.h"
#include "pipeline/child_process.h"
#include "pipeline/spec_reader.h"
#include "pipeline/stage_run.h"

namespace ptk::pipeline {
namespace {

using rapidjson::Value;
using Clock = std::chrono::steady_clock;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// One point of the sweep: the varying overrides as (key, value text) pairs.
using Point = std::vector<std::pair<std::string, std::string>>;

struct SweepSpec {
  std::string file, dir, command, recipe;
  std::vector<std::string> overrides, metrics;
  std::vector<Point> points;
  std::vector<std::string> keys;  // varying keys, first-seen order
  int64_t parallel = 1;
  EvalSpec eval;
};

std::vector<std::string> default_metrics(const std::string& command) {
  if (command == "sft") return {"loss", "eval/loss", "eval/mean_token_accuracy"};
  if (command == "dpo") return {"loss", "rewards/accuracies", "rewards/margins"};
  if (command == "rm") return {"loss", "eval/accuracy"};
  return {"reward", "eval/accuracy", "eval/sampled_accuracy", "kl"};
}

SweepSpec parse(const config::RecipeJson& json, const std::string& file) {
  SpecReader r(json);
  SweepSpec s;
  s.file = file;
  const Value& root = r.root();
  r.only_keys(root, "", {"command", "recipe", "overrides", "grid", "runs", "parallel", "metrics", "eval", "run"});
  s.command = r.choice(root, "", "command", "", stage_commands(), true);
  s.recipe = r.recipe_path(root, "", "recipe", true);
  s.overrides = r.overrides(root, "", "overrides");
  s.parallel = r.integer(root, "", "parallel", 1);
  if (s.parallel < 1) r.error("parallel", "must be >= 1, got " + std::to_string(s.parallel));
  if (const Value* run = r.find(root, "", "run")) {
    r.only_keys(*run, "run", {"dir"});
    s.dir = r.str(*run, "run", "dir", "");
  }
  if (s.dir.empty()) s.dir = config::default_run_dir(file);
  if (const Value* ev = r.find(root, "", "eval")) {
    r.only_keys(*ev, "eval", {"data", "verifier", "max_new_tokens", "limit"});
    s.eval.data = r.str(*ev, "eval", "data", "", true);
    s.eval.verifier = r.str(*ev, "eval", "verifier", "math");
    s.eval.max_new_tokens = r.integer(*ev, "eval", "max_new_tokens", 0);
    s.eval.limit = r.integer(*ev, "eval", "limit", 0);
  }
  s.metrics = default_metrics(s.command);
  if (const Value* m = r.find(root, "", "metrics")) {
    s.metrics.clear();
    if (!m->IsArray()) r.error("metrics", "must be a list of metric names, e.g. [\"loss\", \"eval/loss\"]");
    else
      for (auto& x : m->GetArray()) {
        if (x.IsString()) s.metrics.push_back(x.GetString());
        else r.error("metrics", "every entry must be a string, got " + json::to_string(x));
      }
  }
  auto note_key = [&](const std::string& k) {
    if (std::find(s.keys.begin(), s.keys.end(), k) == s.keys.end()) s.keys.push_back(k);
  };
  std::vector<Point> listed = {{}};
  if (const Value* runs = r.find(root, "", "runs")) {
    listed.clear();
    if (!runs->IsArray() || runs->Empty()) {
      r.error("runs", "must be a non-empty list of {\"key.path\": value, ...} objects");
    } else {
      for (rapidjson::SizeType i = 0; i < runs->Size(); ++i) {
        const Value& e = (*runs)[i];
        std::string path = "runs[" + std::to_string(i) + "]";
        if (!e.IsObject()) {
          r.error(path, "must be an object {\"key.path\": value, ...}");
          continue;
        }
        Point p;
        for (auto it = e.MemberBegin(); it != e.MemberEnd(); ++it) {
          p.push_back({it->name.GetString(), json::to_string(it->value)});
          note_key(it->name.GetString());
        }
        listed.push_back(p);
      }
    }
  }
  std::vector<std::pair<std::string, std::vector<std::string>>> axes;
  if (const Value* grid = r.find(root, "", "grid")) {
    if (!grid->IsObject()) r.error("grid", "must be an object {\"key.path\": [value, ...], ...}");
    else
      for (auto it = grid->MemberBegin(); it != grid->MemberEnd(); ++it) {
        std::string k = it->name.GetString();
        if (!it->value.IsArray() || it->value.Empty()) {
          r.error("grid." + k, "must be a non-empty list of values, got " + json::to_string(it->value));
          continue;
        }
        std::vector<std::string> vals;
        for (auto& v : it->value.GetArray()) vals.push_back(json::to_string(v));
        axes.push_back({k, vals});
        note_key(k);
      }
  }
  if (!r.find(root, "", "grid") && !r.find(root, "", "runs"))
    r.error("grid", "missing: give a \"grid\" {\"key.path\": [values]} and/or \"runs\" [{\"key.path\": value}]");
  for (auto& base : listed) {
    std::vector<Point> pts = {base};
    for (auto& [k, vals] : axes) {
      std::vector<Point> next;
      for (auto& p : pts)
        for (auto& v : vals) {
          Point q = p;
          q.push_back({k, v});
          next.push_back(q);
        }
      pts = next;
    }
    s.points.insert(s.points.end(), pts.begin(), pts.end());
  }
  for (auto& k : s.keys)
    if (k == "run.dir") r.error("grid", "run.dir is set by the sweep (<run.dir>/<run name>); do not vary it");
  r.throw_if_errors("sweep recipe " + file);
  return s;
}

std::string unquote(const std::string& v) {
  return v.size() >= 2 && v.front() == '"' && v.back() == '"' ? v.substr(1, v.size() - 2) : v;
}

// Folder names from the varying values: "lr=0.001,warmup_steps=20" (the last key component
// unless two keys share it).
std::vector<std::string> run_names(const SweepSpec& s) {
  std::map<std::string, int> last_count;
  auto last = [](const std::string& k) {
    size_t d = k.rfind('.');
    return d == std::string::npos ? k : k.substr(d + 1);
  };
  for (auto& k : s.keys) last_count[last(k)]++;
  std::vector<std::string> names;
  std::set<std::string> used;
  for (size_t i = 0; i < s.points.size(); ++i) {
    std::string n;
    for (auto& [k, v] : s.points[i]) {
      std::string key = last_count[last(k)] > 1 ? k : last(k);
      n += (n.empty() ? "" : ",") + key + "=" + unquote(v);
    }
    for (char& c : n)
      if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-' || c == '=' || c == ','))
        c = '_';
    if (n.empty()) n = "run";
    if (n.size() > 120) n = n.substr(0, 100) + "-" + short_hash(n).substr(0, 8);
    std::string unique = n;
    for (int k = 2; used.count(unique); ++k) unique = n + "-" + std::to_string(k);
    used.insert(unique);
    names.push_back(unique);
  }
  return names;
}

struct Item {
  StageRun run;
  Point point;
  RunState state = RunState::kNew;
  std::string status = "not run";
  double seconds = kNaN, accuracy = kNaN;
  std::unique_ptr<proc::Child> child;
  Clock::time_point t0;
};

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

std::string metric_file(const std::string& m) {
  std::string f = m;
  for (char& c : f)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) c = '_';
  return f;
}

void write_report(const SweepSpec& s, std::vector<Item>& items) {
  std::vector<std::string> cols = s.metrics;
  std::string md = "# sweep " + s.file + "\n\n`ptk " + s.command + " --recipe " + s.recipe + "`";
  for (auto& o : s.overrides) md += " `" + o + "`";
  md += "\n\n| run | ";
  std::string csv = "run,";
  for (auto& k : s.keys) {
    md += k + " | ";
    csv += csv_field(k) + ",";
  }
  md += "status | time | step | ";
  csv += "status,seconds,step,";
  for (auto& m : cols) {
    md += m + " | ";
    csv += csv_field(m) + ",";
  }
  std::string acc = "held-out accuracy" + (s.eval.enabled() ? " (" + s.eval.verifier + ")" : std::string());
  md += acc + " |\n| --- | ";
  csv += csv_field(acc) + "\n";
  for (size_t i = 0; i < s.keys.size(); ++i) md += "--- | ";
  md += "--- | ---: | ---: | ";
  for (size_t i = 0; i < cols.size(); ++i) md += "---: | ";
  md += "---: |\n";
  std::vector<plot::MetricsLog> logs;
  for (auto& it : items) {
    auto last = last_metrics(it.run.run_dir);
    std::string name = it.run.label;
    md += "| " + name + " | ";
    csv += csv_field(name) + ",";
    for (auto& k : s.keys) {
      std::string v = "—";
      for (auto& [pk, pv] : it.point)
        if (pk == k) v = unquote(pv);
      md += v + " | ";
      csv += csv_field(v) + ",";
    }
    auto step = last.count("step") ? last["step"] : kNaN;
    md += it.status + " | " + (std::isfinite(it.seconds) ? format_duration(it.seconds) : "—") + " | " + fmt(step) + " | ";
    char secs[32] = "";
    if (std::isfinite(it.seconds)) std::snprintf(secs, sizeof secs, "%.1f", it.seconds);
    csv += csv_field(it.status) + "," + secs + "," + (std::isfinite(step) ? fmt(step) : "") + ",";
    for (auto& m : cols) {
      double v = last.count(m) ? last[m] : kNaN;
      md += fmt(v) + " | ";
      char buf[32] = "";
      if (std::isfinite(v)) std::snprintf(buf, sizeof buf, "%.6g", v);
      csv += std::string(buf) + ",";
    }
    md += fmt(it.accuracy) + " |\n";
    char buf[32] = "";
    if (std::isfinite(it.accuracy)) std::snprintf(buf, sizeof buf, "%.6g", it.accuracy);
    csv += std::string(buf) + "\n";
    if (path_exists(it.run.run_dir + "/metrics.jsonl")) logs.push_back(plot::read_metrics(it.run.run_dir + "/metrics.jsonl", name));
  }
  // Curves: one SVG per metric, every run overlaid.
  std::string pics;
  if (!logs.empty()) {
    make_dirs(s.dir + "/plots");
    for (auto& m : cols) {
      bool present = false;
      for (auto& l : logs) present |= l.values.count(m) > 0;
      if (!present) continue;
      auto charts = plot::metric_charts(logs, {m});
      std::string f = "plots/" + metric_file(m) + ".svg";
      write_file_atomic(s.dir + "/" + f, plot::render_svg(charts));
      pics += "![" + m + "](" + f + ")\n";
    }
  }
  if (!pics.empty()) md += "\n" + pics;
  make_dirs(s.dir);
  write_file_atomic(s.dir + "/sweep.md", md);
  write_file_atomic(s.dir + "/sweep.csv", csv);
  std::printf("\nsweep summary (%s):\n", s.dir.c_str());
  // The table part of the markdown, for the terminal.
  std::printf("%s", md.substr(md.find("| run"), md.find("\n\n![") == std::string::npos ? std::string::npos
                                                                                          : md.find("\n\n![") - md.find("| run") + 1).c_str());
  std::printf("wrote %s/sweep.md, %s/sweep.csv and %s/plots/\n", s.dir.c_str(), s.dir.c_str(), s.dir.c_str());
}

}  // namespace

int run_sweep(const std::string& recipe_file, const std::vector<std::string>& overrides, const SweepOptions& o) {
  if (recipe_file.empty()) throw UsageError("ptk sweep: --recipe FILE is required\n---> HINT: ptk sweep --help");
  auto json = config::load_recipe(recipe_file, overrides);
  SweepSpec s = parse(json, recipe_file);
  int parallel = o.parallel > 0 ? o.parallel : static_cast<int>(s.parallel);
  int threads = o.threads > 0 ? o.threads : std::max(1, proc::usable_cores() / parallel);
  auto names = run_names(s);
  std::vector<Item> items(s.points.size());
  for (size_t i = 0; i < items.size(); ++i) {
    Item& it = items[i];
    it.point = s.points[i];
    it.run.label = names[i];
    it.run.command = s.command;
    it.run.recipe = s.recipe;
    it.run.overrides = s.overrides;
    for (auto& [k, v] : it.point) it.run.overrides.push_back(k + "=" + v);
    it.run.run_dir = s.dir + "/" + names[i];
    compute_fingerprint(it.run);  // also checks every override against the recipe file
    it.state = inspect(it.run);
  }
  std::printf("sweep %s: %zu runs of ptk %s --recipe %s, %d at a time, --threads %d each -> %s/\n",
              recipe_file.c_str(), items.size(), s.command.c_str(), s.recipe.c_str(), parallel, threads, s.dir.c_str());
  for (auto& it : items)
    std::printf("  %-40s %s\n", it.run.label.c_str(), it.state == RunState::kDone ? "done (skipped)" : state_name(it.state));
  std::fflush(stdout);
  proc::install_signal_handlers();
  if (o.dry_run) {
    // Every run's command line with --check: a grid value the stage would refuse shows now.
    int invalid = 0;
    for (auto& it : items) {
      invalid += !check_command(stage_argv(o.ptk, it.run, threads), it.run.label);
      if (proc::stop_signal()) return 128 + proc::stop_signal();
    }
    if (invalid > 0) std::fprintf(stderr, "sweep: %d of %zu runs have an invalid recipe (above)\n", invalid, items.size());
    return invalid > 0 ? 1 : 0;
  }

  int failures = 0;
  if (!o.report_only) {
    std::deque<Item*> pending;
    for (auto& it : items) {
      if (it.state == RunState::kDone) {
        it.status = "skipped (done)";
        it.seconds = stamp_seconds(it.run.run_dir);
      } else {
        pending.push_back(&it);
      }
    }
    std::vector<Item*> active;
    while ((!pending.empty() || !active.empty())) {
      while (!proc::stop_signal() && static_cast<int>(active.size()) < parallel && !pending.empty()) {
        Item* it = pending.front();
        pending.pop_front();
        if (it->state == RunState::kChanged) {
          std::string old = set_aside(it->run.run_dir);
          std::printf("run %s: %s held a run of a different recipe; moved it to %s and starting over\n",
                      it->run.label.c_str(), it->run.run_dir.c_str(), old.c_str());
        }
        write_stamp(it->run, "started", kNaN);
        std::printf("run %s: starting\n", it->run.label.c_str());
        std::fflush(stdout);
        it->t0 = Clock::now();
        it->child = std::make_unique<proc::Child>(proc::ChildSpec{stage_argv(o.ptk, it->run, threads), it->run.label, {}, {}});
        active.push_back(it);
      }
      if (active.empty()) break;  // interrupted before anything else started
      std::vector<proc::Child*> kids;
      for (Item* it : active) kids.push_back(it->child.get());
      proc::pump(kids, 100);
      for (size_t k = 0; k < active.size();) {
        Item* it = active[k];
        if (it->child->running()) {
          ++k;
          continue;
        }
        proc::wait_for(*it->child, {});  // drain its output
        it->seconds = std::chrono::duration<double>(Clock::now() - it->t0).count();
        int status = it->child->status();
        if (proc::stop_signal()) {
          it->status = "interrupted";
        } else if (status == 0 && final_complete(it->run.run_dir)) {
          it->status = it->state == RunState::kResume ? "resumed" : "ran";
          write_stamp(it->run, "done", it->seconds);
        } else {
          it->status = "failed";
          ++failures;
          std::fprintf(stderr, "sweep: run %s failed: `%s` %s\nlast lines:\n%s", it->run.label.c_str(),
                       it->child->command_line().c_str(), it->child->describe().c_str(), it->child->tail(12).c_str());
        }
        it->child.reset();
        active.erase(active.begin() + static_cast<long>(k));
      }
    }
    // Held-out accuracy of every finished run (cached in its stamp).
    if (s.eval.enabled() && !proc::stop_signal()) {
      for (auto& it : items) {
        if (proc::stop_signal()) break;
        if (it.status == "failed" || it.status == "not run" || !final_complete(it.run.run_dir)) continue;
        it.accuracy = heldout_accuracy(o.ptk, it.run, s.eval, o.threads > 0 ? o.threads : proc::usable_cores(),
                                       it.run.label);
        std::printf("held-out accuracy of %s: %s\n", it.run.label.c_str(), fmt(it.accuracy).c_str());
      }
    }
  } else {
    for (auto& it : items) {
      it.status = it.state == RunState::kDone ? "done" : state_name(it.state);
      it.seconds = stamp_seconds(it.run.run_dir);
      if (s.eval.enabled() && it.state == RunState::kDone)
        it.accuracy = heldout_accuracy(o.ptk, it.run, s.eval, o.threads, it.run.label);
    }
  }
  write_report(s, items);
  if (proc::stop_signal()) {
    std::fprintf(stderr, "sweep: interrupted; rerun the same command: finished runs are skipped, the interrupted ones "
                         "resume from their last checkpoint\n");
    return 128 + proc::stop_signal();
  }
  return failures ? 1 : 0;
}

}  // namespace ptk::pipeline
