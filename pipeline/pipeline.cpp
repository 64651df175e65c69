#include "pipeline/pipeline.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <set>

#include "core/config/recipe.h"
#include "core/config/sections.h"  // default_run_dir
#include "core/train/run_folder.h"
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

struct SetupStep {
  std::vector<std::string> args;  // ptk arguments
  std::string creates;
};

struct ServerSpec {
  bool enabled = false;
  std::string recipe, url, url_key, model_from;
  std::vector<std::string> overrides;
  int64_t threads = 0, start_timeout_s = 300;
};

struct StageSpec {
  std::string name, command, recipe, model_from;
  std::vector<std::string> overrides;
  bool eval = true;
  ServerSpec server;
};

struct PipelineSpec {
  std::string file, dir;
  std::vector<SetupStep> setup;
  EvalSpec eval;
  std::vector<StageSpec> stages;
  std::vector<std::string> overrides;  // the top-level "overrides": every stage's, before its own
};

bool is_policy(const std::string& command) { return command != "rm"; }

// A stage folder the pipeline does not run a stage in now (done, or about to be moved aside): the
// leftovers of a crashed run of that stage (a partial final/ or checkpoint) go as they would at the
// stage's own next start (core/train/run_folder.h). A stage that runs cleans its folder itself.
void tidy_stage_folder(const std::string& stage, const std::string& dir) {
  if (!path_exists(dir)) return;
  RunFolderLock lock(dir);
  if (lock.state() == RunFolderLock::State::kBusy) {
    std::printf("stage %s: %s is in use by another ptk process (%s); leaving its temporaries alone\n", stage.c_str(),
                dir.c_str(), lock.holder().c_str());
    return;
  }
  for (const Leftover& l : clean_leftovers(dir, lock.state() == RunFolderLock::State::kHeld))
    std::printf("stage %s: %s\n", stage.c_str(), describe(l).c_str());
}

// `model_from`: "<stage>" (its final/) or "<stage>@step-N" (its checkpoints/step-N, a saved HF
// folder the stage kept). Returns {stage, checkpoint}; checkpoint is "" for final/.
std::pair<std::string, std::string> split_model_from(const std::string& v) {
  auto at = v.find('@');
  if (at == std::string::npos) return {v, ""};
  return {v.substr(0, at), v.substr(at + 1)};
}

// Checks a `model_from` value against the stages named so far; empty = fine.
std::string model_from_error(const std::string& v, const std::set<std::string>& names) {
  auto [stage, ckpt] = split_model_from(v);
  if (!names.count(stage)) return "`" + stage + "` is not an earlier stage's name";
  if (v.find('@') != std::string::npos) {
    bool ok = ckpt.size() > 5 && ckpt.rfind("step-", 0) == 0 &&
              ckpt.find_first_not_of("0123456789", 5) == std::string::npos;
    if (!ok) return "`" + v + "`: after '@' give a checkpoint of that stage, step-N (its checkpoints/step-N folder)";
  }
  return "";
}

// The folder `model_from` names under the pipeline's run folder.
std::string model_from_dir(const std::string& run_dir, const std::string& v) {
  auto [stage, ckpt] = split_model_from(v);
  return run_dir + "/" + stage + (ckpt.empty() ? "/final" : "/checkpoints/" + ckpt);
}

PipelineSpec parse(const config::RecipeJson& json, const std::string& file, const PipelineOptions& o) {
  SpecReader r(json);
  PipelineSpec p;
  p.file = file;
  const Value& root = r.root();
  r.only_keys(root, "", {"run", "setup", "eval", "stages", "overrides"});
  // Top-level overrides reach every stage (e.g. {"model.lora.enabled": true}); a stage's own
  // overrides come after them and win.
  p.overrides = r.overrides(root, "", "overrides");
  for (auto& o : p.overrides)
    if (o.rfind("run.dir=", 0) == 0) r.error("overrides", "run.dir is set by the pipeline (<run.dir>/<stage name>); remove it");
  if (const Value* run = r.find(root, "", "run")) {
    r.only_keys(*run, "run", {"dir"});
    p.dir = r.str(*run, "run", "dir", "");
  }
  if (p.dir.empty()) p.dir = config::default_run_dir(file);
  if (const Value* setup = r.find(root, "", "setup")) {
    if (!setup->IsArray()) {
      r.error("setup", "must be a list of {\"ptk\": [args...], \"creates\": path}");
    } else {
      for (rapidjson::SizeType i = 0; i < setup->Size(); ++i) {
        std::string path = "setup[" + std::to_string(i) + "]";
        const Value& s = (*setup)[i];
        if (!s.IsObject()) {
          r.error(path, "must be an object {\"ptk\": [args...], \"creates\": path}");
          continue;
        }
        r.only_keys(s, path, {"ptk", "creates"});
        SetupStep step;
        const Value* args = r.find(s, path, "ptk");
        if (!args || !args->IsArray() || args->Empty()) {
          r.error(path + ".ptk", "must be a non-empty list of ptk arguments, e.g. [\"make-data\", \"arithmetic\", ...]");
        } else {
          for (auto& a : args->GetArray()) {
            if (a.IsString()) step.args.push_back(a.GetString());
            else r.error(path + ".ptk", "every argument must be a string, got " + json::to_string(a));
          }
          if (!step.args.empty() && (step.args[0] == "pipeline" || step.args[0] == "sweep"))
            r.error(path + ".ptk", "`" + step.args[0] + "` cannot run as a setup step");
        }
        step.creates = r.str(s, path, "creates", "");
        p.setup.push_back(step);
      }
    }
  }
  if (const Value* ev = r.find(root, "", "eval")) {
    r.only_keys(*ev, "eval", {"data", "verifier", "max_new_tokens", "limit"});
    p.eval.data = r.str(*ev, "eval", "data", "", true);
    p.eval.verifier = r.str(*ev, "eval", "verifier", "math");
    p.eval.max_new_tokens = r.integer(*ev, "eval", "max_new_tokens", 0);
    p.eval.limit = r.integer(*ev, "eval", "limit", 0);
  }
  const Value* stages = r.find(root, "", "stages");
  if (!stages || !stages->IsArray() || stages->Empty()) {
    r.error("stages", "must be a non-empty list of {\"command\": \"sft|dpo|rm|grpo\", \"recipe\": FILE, ...}");
  } else {
    std::set<std::string> names;
    for (rapidjson::SizeType i = 0; i < stages->Size(); ++i) {
      std::string path = "stages[" + std::to_string(i) + "]";
      const Value& s = (*stages)[i];
      if (!s.IsObject()) {
        r.error(path, "must be an object {\"command\": ..., \"recipe\": ...}");
        continue;
      }
      r.only_keys(s, path, {"name", "command", "recipe", "overrides", "model_from", "eval", "reward_server"});
      StageSpec st;
      st.command = r.choice(s, path, "command", "", stage_commands(), true);
      st.name = r.str(s, path, "name", st.command);
      st.recipe = r.recipe_path(s, path, "recipe", true);
      st.overrides = r.overrides(s, path, "overrides");
      for (auto& o : st.overrides)
        if (o.rfind("run.dir=", 0) == 0)
          r.error(path + ".overrides", "run.dir is set by the pipeline (<run.dir>/<stage name>); remove it");
      st.model_from = r.str(s, path, "model_from", "");
      st.eval = r.boolean(s, path, "eval", st.command != "rm");
      if (!st.name.empty() && !names.insert(st.name).second)
        r.error(path + ".name", "`" + st.name + "` names two stages; give each a distinct \"name\" (its run folder)");
      if (st.name.find('/') != std::string::npos || st.name == "." || st.name == "..")
        r.error(path + ".name", "`" + st.name + "` must be a plain folder name");
      if (!st.model_from.empty()) {
        std::string e = model_from_error(st.model_from, names);
        if (!e.empty()) r.error(path + ".model_from", e);
      }
      if (const Value* rs = r.find(s, path, "reward_server")) {
        std::string sp = path + ".reward_server";
        r.only_keys(*rs, sp, {"recipe", "overrides", "model_from", "url", "url_key", "threads", "start_timeout_s"});
        ServerSpec& sv = st.server;
        sv.enabled = true;
        sv.url = r.str(*rs, sp, "url", "");
        sv.recipe = r.recipe_path(*rs, sp, "recipe", false);
        sv.overrides = r.overrides(*rs, sp, "overrides");
        sv.model_from = r.str(*rs, sp, "model_from", "");
        sv.url_key = r.str(*rs, sp, "url_key", "grpo.reward_urls");
        sv.threads = r.integer(*rs, sp, "threads", 0);
        sv.start_timeout_s = r.integer(*rs, sp, "start_timeout_s", 300);
        if (sv.url.empty() == (r.find(*rs, sp, "recipe") == nullptr))
          r.error(sp, "give either \"recipe\" (the pipeline starts a local server) or \"url\" (a running one)");
        if (!sv.model_from.empty()) {
          std::string e = model_from_error(sv.model_from, names);
          if (!e.empty()) r.error(sp + ".model_from", e);
        }
        if (st.command != "grpo") r.error(sp, "only a grpo stage uses a reward server");
      }
      p.stages.push_back(st);
    }
  }
  r.throw_if_errors("pipeline recipe " + file);
  return p;
}

struct Row {
  std::string name, command, status = "not run", run_dir;
  double seconds = kNaN, accuracy = kNaN;
  std::map<std::string, double> metrics;
  std::map<std::string, double> start;  // eval_start.json: shown as "start → last"
};

// The metrics a summary row shows per command (the first present of each group).
std::string key_metrics(const Row& row) {
  static const std::map<std::string, std::vector<std::string>> kShow = {
      {"sft", {"loss", "eval/loss", "eval/mean_token_accuracy"}},
      {"dpo", {"loss", "rewards/accuracies", "rewards/margins"}},
      {"rm", {"loss", "eval/accuracy", "accuracy"}},
      {"grpo", {"reward", "eval/accuracy", "eval/sampled_accuracy", "kl"}}};
  std::string s;
  auto it = kShow.find(row.command);
  if (it == kShow.end()) return s;
  for (auto& m : it->second) {
    auto v = row.metrics.find(m);
    if (v == row.metrics.end()) continue;
    auto b = row.start.find(m);
    s += (s.empty() ? "" : ", ") + m + " " + (b != row.start.end() ? fmt(b->second) + " → " : "") + fmt(v->second);
  }
  return s.empty() ? "—" : s;
}

std::string summary_table(const std::vector<Row>& rows, const EvalSpec& eval) {
  std::string acc = eval.enabled() ? "held-out accuracy (" + eval.verifier + ")" : "held-out accuracy";
  std::string t = "| stage | command | status | time | " + acc + " | last metrics | output |\n"
                  "| --- | --- | --- | ---: | ---: | --- | --- |\n";
  for (auto& r : rows) {
    t += "| " + r.name + " | " + r.command + " | " + r.status + " | " +
         (std::isfinite(r.seconds) ? format_duration(r.seconds) : "—") + " | " +
         (std::isfinite(r.accuracy) ? fmt(r.accuracy) : "—") + " | " + key_metrics(r) + " | " +
         (final_complete(r.run_dir) ? r.run_dir + "/final" : "—") + " |\n";
  }
  return t;
}

// The command line of a GRPO stage's local reward server.
std::vector<std::string> server_argv(const PipelineOptions& o, const ServerSpec& sv, const std::vector<std::string>& ovs) {
  std::vector<std::string> argv = {o.ptk, "reward-server", "--recipe", sv.recipe, "--host", "127.0.0.1", "--port", "0"};
  int threads = sv.threads > 0 ? static_cast<int>(sv.threads) : o.threads;
  if (threads > 0) argv.insert(argv.end(), {"--threads", std::to_string(threads)});
  argv.insert(argv.end(), ovs.begin(), ovs.end());
  return argv;
}

// A local reward server for one GRPO stage: started, waited on until `listening on`, stopped.
std::unique_ptr<proc::Child> start_server(const PipelineOptions& o, const ServerSpec& sv,
                                          const std::vector<std::string>& ovs, std::string* url) {
  std::vector<std::string> argv = server_argv(o, sv, ovs);
  auto found = std::make_shared<std::string>();
  proc::ChildSpec spec{argv, "reward-server", {}, [found](const std::string& line) {
                         auto p = line.find("listening on http://");
                         if (p != std::string::npos && found->empty()) {
                           std::string u = line.substr(p + 13);
                           while (!u.empty() && (u.back() == ' ' || u.back() == '\r')) u.pop_back();
                           *found = u;
                         }
                       }};
  auto child = std::make_unique<proc::Child>(spec);
  auto deadline = Clock::now() + std::chrono::seconds(sv.start_timeout_s);
  while (found->empty()) {
    proc::pump({child.get()}, 100);
    if (proc::stop_signal()) {
      proc::stop(*child);
      return nullptr;
    }
    if (!child->running()) {
      proc::wait_for(*child);
      throw Error("the reward server for the grpo stage " + child->describe() + " before it was ready:\n  " +
                  child->command_line() + "\nlast lines:\n" + child->tail(12) +
                  "---> HINT: run that command by hand to see the problem; `ptk reward-server --help` lists its keys");
    }
    if (Clock::now() > deadline) {
      proc::stop(*child);
      throw Error("the reward server did not print `listening on` within " + std::to_string(sv.start_timeout_s) +
                  " s:\n  " + child->command_line() + "\n---> HINT: raise reward_server.start_timeout_s");
    }
  }
  *url = *found;
  return child;
}

}  // namespace

int run_pipeline(const std::string& recipe_file, const std::vector<std::string>& overrides,
                 const PipelineOptions& o) {
  if (recipe_file.empty()) throw UsageError("ptk pipeline: --recipe FILE is required\n---> HINT: ptk pipeline --help");
  auto json = config::load_recipe(recipe_file, overrides);
  PipelineSpec spec = parse(json, recipe_file, o);

  std::printf("pipeline %s: %zu stages -> %s/\n", recipe_file.c_str(), spec.stages.size(), spec.dir.c_str());
  for (auto& st : spec.stages)
    std::printf("  %-6s ptk %-5s --recipe %s\n", st.name.c_str(), st.command.c_str(), st.recipe.c_str());
  std::fflush(stdout);
  proc::install_signal_handlers();

  // Setup steps (e.g. make-data): run unless what they create is there.
  for (auto& s : spec.setup) {
    std::string line = "ptk";
    for (auto& a : s.args) line += " " + a;
    if (!s.creates.empty() && path_exists(s.creates)) {
      std::printf("setup: %s exists, skipping `%s`\n", s.creates.c_str(), line.c_str());
      continue;
    }
    if (o.dry_run) {
      std::printf("setup: would run `%s`\n", line.c_str());
      continue;
    }
    std::printf("setup: %s\n", line.c_str());
    std::fflush(stdout);
    std::vector<std::string> argv = {o.ptk};
    argv.insert(argv.end(), s.args.begin(), s.args.end());
    proc::Child child({argv, s.args[0], {}, {}});
    int st = proc::wait_for(child);
    if (proc::stop_signal()) return 128 + proc::stop_signal();
    if (st != 0) throw Error("pipeline setup step `" + line + "` " + child.describe() + "\nlast lines:\n" + child.tail(12));
    if (!s.creates.empty() && !path_exists(s.creates))
      throw Error("pipeline setup step `" + line + "` succeeded but did not create " + s.creates +
                  "\n---> HINT: fix setup[].creates in " + recipe_file);
  }

  std::vector<Row> rows;
  for (auto& st : spec.stages) {
    Row r;
    r.name = st.name;
    r.command = st.command;
    r.run_dir = spec.dir + "/" + st.name;
    rows.push_back(r);
  }
  std::map<std::string, std::string> fp_of;  // stage name -> short hash of its fingerprint
  std::string last_policy, last_rm;
  int exit_code = 0;
  if (!o.dry_run) make_dirs(spec.dir);

  for (size_t i = 0; i < spec.stages.size(); ++i) {
    const StageSpec& st = spec.stages[i];
    Row& row = rows[i];
    if (proc::stop_signal()) break;
    StageRun run;
    run.label = st.name;
    run.command = st.command;
    run.recipe = st.recipe;
    run.overrides = spec.overrides;
    run.overrides.insert(run.overrides.end(), st.overrides.begin(), st.overrides.end());
    run.run_dir = row.run_dir;
    std::string from = !st.model_from.empty() ? st.model_from : last_policy;
    if (!from.empty()) {
      run.overrides.push_back("model.path=" + model_from_dir(spec.dir, from));
      run.overrides.push_back("model.config=\"\"");
      run.upstream += from + ":" + fp_of[split_model_from(from).first] + "\n";
    }
    std::vector<std::string> volatile_keys;
    std::vector<std::string> server_overrides;  // a local reward server's: its recipe's plus the RM folder
    if (st.server.enabled) {
      volatile_keys.push_back(st.server.url_key);
      if (st.server.url.empty()) {
        std::string rm = !st.server.model_from.empty() ? st.server.model_from : last_rm;
        server_overrides = st.server.overrides;
        if (!rm.empty()) {
          server_overrides.push_back("reward.model=" + model_from_dir(spec.dir, rm));
          run.upstream += "reward-model " + rm + ":" + fp_of[split_model_from(rm).first] + "\n";
        }
        run.upstream +=
            "reward-server " + json::to_string(config::load_recipe(st.server.recipe, server_overrides).doc) + "\n";
      } else {
        run.upstream += "reward-url " + st.server.url + "\n";
      }
    }
    compute_fingerprint(run, volatile_keys);
    fp_of[st.name] = short_hash(run.fingerprint);
    RunState state = inspect(run);

    if (o.dry_run) {
      row.status = state == RunState::kDone     ? "would skip (done)"
                   : state == RunState::kResume ? "would resume"
                   : state == RunState::kNew    ? "would run"
                                                : "would start over (recipe or input changed)";
      std::printf("stage %s: %s\n", st.name.c_str(), row.status.c_str());
      std::fflush(stdout);
      // The stage's command line (and its reward server's) run with --check: a key or value the
      // stage would refuse shows now, not after the stages before it have trained.
      std::vector<std::string> extra;
      bool valid = true;
      if (st.server.enabled) {
        // The server's port is not known before it starts; port 0 stands for it.
        extra.push_back(st.server.url_key + "=[\"" + (st.server.url.empty() ? "http://127.0.0.1:0" : st.server.url) +
                        "\"]");
        if (st.server.url.empty()) valid &= check_command(server_argv(o, st.server, server_overrides), st.name);
      }
      valid &= check_command(stage_argv(o.ptk, run, o.threads, extra), st.name);
      if (proc::stop_signal()) return 128 + proc::stop_signal();
      if (!valid) {
        row.status = "invalid recipe";
        exit_code = 1;
      }
      if (is_policy(st.command)) last_policy = st.name;
      else last_rm = st.name;
      continue;
    }
    if (state != RunState::kDone && !from.empty() && !path_exists(model_from_dir(spec.dir, from))) {
      auto [stage, ckpt] = split_model_from(from);
      std::fprintf(stderr, "pipeline: stage `%s` starts from %s, which does not exist%s; stopping here.\n",
                   st.name.c_str(), model_from_dir(spec.dir, from).c_str(),
                   ckpt.empty() ? ""
                                : (" (stage `" + stage + "` keeps its last checkpoint.keep_last checkpoints, one every "
                                   "checkpoint.every steps: name one it kept)").c_str());
      row.status = "failed";
      exit_code = 1;
      break;
    }
    if (state == RunState::kDone) {
      tidy_stage_folder(st.name, run.run_dir);
      row.status = "skipped (done)";
      row.seconds = stamp_seconds(run.run_dir);
      std::printf("stage %s: %s/final is complete for this recipe; skipping\n", st.name.c_str(), run.run_dir.c_str());
    } else {
      if (state == RunState::kChanged) {
        tidy_stage_folder(st.name, run.run_dir);  // the folder is kept; its temporaries are not worth keeping
        std::string old = set_aside(run.run_dir);
        std::printf("stage %s: %s held a run of a different recipe or input; moved it to %s and starting over\n",
                    st.name.c_str(), run.run_dir.c_str(), old.c_str());
      } else if (state == RunState::kResume) {
        std::printf("stage %s: an unfinished run is in %s; rerunning it (its resume=auto continues from the last "
                    "checkpoint)\n", st.name.c_str(), run.run_dir.c_str());
      }
      std::unique_ptr<proc::Child> server;
      std::vector<std::string> extra;
      if (st.server.enabled) {
        std::string url = st.server.url;
        if (url.empty()) {
          std::printf("stage %s: starting its reward server (%s)\n", st.name.c_str(), st.server.recipe.c_str());
          std::fflush(stdout);
          server = start_server(o, st.server, server_overrides, &url);
          if (!server) break;  // interrupted while starting
          std::printf("stage %s: reward server ready at %s\n", st.name.c_str(), url.c_str());
        }
        extra.push_back(st.server.url_key + "=[\"" + url + "\"]");
      }
      write_stamp(run, "started", kNaN);
      std::printf("stage %s: ptk %s -> %s\n", st.name.c_str(), st.command.c_str(), run.run_dir.c_str());
      std::fflush(stdout);
      auto t0 = Clock::now();
      proc::Child child({stage_argv(o.ptk, run, o.threads, extra), st.name, {}, {}});
      std::vector<proc::Child*> also;
      if (server) also.push_back(server.get());
      int status = proc::wait_for(child, also);
      row.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      if (server) {
        proc::stop(*server);
        std::printf("stage %s: reward server stopped\n", st.name.c_str());
      }
      if (proc::stop_signal()) {
        row.status = "interrupted";
        exit_code = 128 + proc::stop_signal();
        break;
      }
      if (status != 0 || !final_complete(run.run_dir)) {
        row.status = status == 2 ? "failed (usage)" : "failed";
        std::fprintf(stderr,
                     "pipeline: stage `%s` failed: `%s` %s%s\nlast lines:\n%s"
                     "---> HINT: fix the problem and rerun the same command: finished stages are skipped and this "
                     "one resumes from its last checkpoint\n",
                     st.name.c_str(), child.command_line().c_str(), child.describe().c_str(),
                     status == 0 ? " but wrote no complete final/" : "", child.tail(12).c_str());
        exit_code = status == 2 ? 2 : 1;
        break;
      }
      row.status = state == RunState::kResume ? "resumed" : "ran";
      write_stamp(run, "done", row.seconds);
    }
    row.metrics = last_metrics(run.run_dir);
    row.start = start_metrics(run.run_dir);
    if (st.eval && spec.eval.enabled()) {
      row.accuracy = heldout_accuracy(o.ptk, run, spec.eval, o.threads, st.name);
      if (proc::stop_signal()) {
        exit_code = 128 + proc::stop_signal();
        break;
      }
      std::printf("held-out accuracy after %s: %s (%s on %s)\n", st.name.c_str(), fmt(row.accuracy).c_str(),
                  spec.eval.verifier.c_str(), spec.eval.data.c_str());
      std::fflush(stdout);
    }
    if (is_policy(st.command)) last_policy = st.name;
    else last_rm = st.name;
  }
  if (proc::stop_signal() && exit_code == 0) exit_code = 128 + proc::stop_signal();

  std::string table = summary_table(rows, spec.eval);
  std::printf("\npipeline summary (%s):\n%s", spec.dir.c_str(), table.c_str());
  if (!o.dry_run) {
    write_file_atomic(spec.dir + "/summary.md", "# pipeline " + recipe_file + "\n\n" + table);
    std::printf("wrote %s/summary.md; each stage's curves are in <stage>/report.md\n", spec.dir.c_str());
  }
  if (exit_code > 128)
    std::fprintf(stderr, "pipeline: interrupted; rerun the same command to continue where it stopped\n");
  return exit_code;
}

}  // namespace ptk::pipeline
