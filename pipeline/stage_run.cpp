#include "pipeline/stage_run.h"

#include <rapidjson/document.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <limits>

#include "core/config/recipe.h"
#include "core/train/plot.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "pipeline/child_process.h"

namespace ptk::pipeline {

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string stamp_path(const std::string& run_dir) { return run_dir + "/ptk_stamp.json"; }

bool read_stamp(const std::string& run_dir, rapidjson::Document* doc) {
  std::string p = stamp_path(run_dir);
  if (!path_exists(p)) return false;
  try {
    *doc = json::parse_file(p);
  } catch (const Error&) {
    return false;  // unreadable: treated as no stamp (the run is redone)
  }
  return doc->IsObject();
}

std::string member_str(const rapidjson::Value& v, const char* name) {
  auto m = v.FindMember(name);
  return m != v.MemberEnd() && m->value.IsString() ? m->value.GetString() : "";
}
}  // namespace

const std::vector<std::string>& stage_commands() {
  static const std::vector<std::string> k = {"sft", "dpo", "rm", "grpo"};
  return k;
}

std::string EvalSpec::key() const {
  return data + "|" + verifier + "|" + std::to_string(max_new_tokens) + "|" + std::to_string(limit);
}

std::string short_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

void compute_fingerprint(StageRun& run, const std::vector<std::string>& volatile_keys) {
  std::vector<std::string> ovs;
  for (auto& o : run.overrides) {
    bool skip = false;
    for (auto& k : volatile_keys) skip |= o.rfind(k + "=", 0) == 0;
    // resume= decides how to continue, not what the result is.
    skip |= o.rfind("resume=", 0) == 0;
    if (!skip) ovs.push_back(o);
  }
  auto merged = config::load_recipe(run.recipe, ovs);
  run.fingerprint = run.command + "\n" + json::to_string(merged.doc) + "\n" + run.upstream;
}

bool final_complete(const std::string& run_dir) {
  std::string f = run_dir + "/final";
  return (path_exists(f + "/config.json") &&
          (path_exists(f + "/model.safetensors") || path_exists(f + "/model.safetensors.index.json"))) ||
         // LoRA: a PEFT adapter folder (core/checkpoint/adapter_config.h)
         (path_exists(f + "/adapter_config.json") && path_exists(f + "/adapter_model.safetensors"));
}

RunState inspect(const StageRun& run) {
  rapidjson::Document st;
  if (!read_stamp(run.run_dir, &st)) {
    bool any = path_exists(run.run_dir + "/metrics.jsonl") || path_exists(run.run_dir + "/checkpoints") ||
               path_exists(run.run_dir + "/final");
    return any ? RunState::kChanged : RunState::kNew;
  }
  if (member_str(st, "fingerprint") != run.fingerprint) return RunState::kChanged;
  if (member_str(st, "state") == "done" && final_complete(run.run_dir)) return RunState::kDone;
  return RunState::kResume;
}

const char* state_name(RunState s) {
  switch (s) {
    case RunState::kNew: return "new";
    case RunState::kResume: return "resume";
    case RunState::kChanged: return "changed";
    case RunState::kDone: return "done";
  }
  return "?";
}

std::string set_aside(const std::string& run_dir) {
  std::string dst;
  for (int n = 1;; ++n) {
    dst = run_dir + ".old-" + std::to_string(n);
    if (!path_exists(dst)) break;
  }
  if (std::rename(run_dir.c_str(), dst.c_str()) != 0)
    throw Error("cannot move " + run_dir + " aside to " + dst + ": " + std::strerror(errno) +
                "\n---> HINT: move or delete " + run_dir + " by hand, then rerun");
  return dst;
}

void write_stamp(const StageRun& run, const std::string& state, double seconds) {
  make_dirs(run.run_dir);
  rapidjson::Document d;
  d.SetObject();
  auto& a = d.GetAllocator();
  d.AddMember("fingerprint", rapidjson::Value(run.fingerprint.c_str(), a), a);
  d.AddMember("state", rapidjson::Value(state.c_str(), a), a);
  d.AddMember("command", rapidjson::Value(run.command.c_str(), a), a);
  d.AddMember("recipe", rapidjson::Value(run.recipe.c_str(), a), a);
  if (std::isfinite(seconds)) d.AddMember("seconds", seconds, a);
  write_file_atomic(stamp_path(run.run_dir), json::to_string(d, true) + "\n");
}

double stamp_seconds(const std::string& run_dir) {
  rapidjson::Document st;
  if (!read_stamp(run_dir, &st)) return kNaN;
  auto m = st.FindMember("seconds");
  return m != st.MemberEnd() && m->value.IsNumber() ? m->value.GetDouble() : kNaN;
}

std::vector<std::string> stage_argv(const std::string& ptk, const StageRun& run, int threads,
                                    const std::vector<std::string>& extra) {
  std::vector<std::string> a = {ptk, run.command, "--recipe", run.recipe};
  if (threads > 0) {
    a.push_back("--threads");
    a.push_back(std::to_string(threads));
  }
  for (auto& o : run.overrides) a.push_back(o);
  a.push_back("run.dir=" + run.run_dir);
  for (auto& e : extra) a.push_back(e);
  return a;
}

bool check_command(const std::vector<std::string>& argv, const std::string& label) {
  std::vector<std::string> a = argv;
  a.push_back("--check");
  proc::Child child({a, label, {}, {}});
  return proc::wait_for(child) == 0;
}

double heldout_accuracy(const std::string& ptk, const StageRun& run, const EvalSpec& eval, int threads,
                        const std::string& label) {
  rapidjson::Document st;
  bool have = read_stamp(run.run_dir, &st);
  if (have) {
    auto e = st.FindMember("eval");
    if (e != st.MemberEnd() && e->value.IsObject() && member_str(e->value, "key") == eval.key() &&
        member_str(st, "fingerprint") == run.fingerprint) {
      auto acc = e->value.FindMember("accuracy");
      if (acc != e->value.MemberEnd() && acc->value.IsNumber()) return acc->value.GetDouble();
    }
  }
  std::string out = run.run_dir + "/heldout_eval.json";
  std::vector<std::string> argv = {ptk, "eval", "--model", run.run_dir + "/final", "--data", eval.data,
                                   "--verifier", eval.verifier, "--output", out};
  if (eval.max_new_tokens > 0) argv.insert(argv.end(), {"--max-new-tokens", std::to_string(eval.max_new_tokens)});
  if (eval.limit > 0) argv.insert(argv.end(), {"--limit", std::to_string(eval.limit)});
  if (threads > 0) argv.insert(argv.end(), {"--threads", std::to_string(threads)});
  proc::Child child({argv, label + " eval", {}, {}});
  int status = proc::wait_for(child);
  if (status != 0) {
    std::fprintf(stderr, "%s: held-out eval failed: `%s` %s; last lines:\n%s", label.c_str(),
                 child.command_line().c_str(), child.describe().c_str(), child.tail(8).c_str());
    return kNaN;
  }
  double acc = kNaN;
  try {
    auto r = json::parse_file(out);
    auto a = r.FindMember("accuracy");
    if (a != r.MemberEnd() && a->value.IsNumber()) acc = a->value.GetDouble();
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: cannot read the eval result: %s\n", label.c_str(), e.what());
  }
  if (have && std::isfinite(acc)) {
    auto& al = st.GetAllocator();
    st.RemoveMember("eval");
    rapidjson::Value ev(rapidjson::kObjectType);
    ev.AddMember("key", rapidjson::Value(eval.key().c_str(), al), al);
    ev.AddMember("accuracy", acc, al);
    st.AddMember("eval", ev, al);
    write_file_atomic(stamp_path(run.run_dir), json::to_string(st, true) + "\n");
  }
  return acc;
}

std::map<std::string, double> last_metrics(const std::string& run_dir) {
  std::map<std::string, double> out;
  if (!path_exists(run_dir + "/metrics.jsonl")) return out;
  auto log = plot::read_metrics(run_dir + "/metrics.jsonl", run_dir);
  for (auto& [name, vals] : log.values)
    for (size_t i = vals.size(); i-- > 0;)
      if (std::isfinite(vals[i])) {
        out[name] = vals[i];
        break;
      }
  if (!log.steps.empty()) out["step"] = static_cast<double>(log.steps.back());
  return out;
}

std::map<std::string, double> start_metrics(const std::string& run_dir) {
  std::map<std::string, double> out;
  const std::string file = run_dir + "/eval_start.json";
  if (!path_exists(file)) return out;
  try {
    auto d = json::parse(read_file(file), file);
    if (!d.IsObject()) return out;
    for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it)
      if (it->value.IsNumber() && std::string(it->name.GetString()) != "step")
        out[it->name.GetString()] = it->value.GetDouble();
  } catch (const std::exception&) {
    out.clear();  // a summary without start figures, not a failed pipeline
  }
  return out;
}

std::string fmt(double v) {
  if (!std::isfinite(v)) return "—";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

}  // namespace ptk::pipeline
