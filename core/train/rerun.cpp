// Safe reruns: the run-folder check before a training command touches anything (see rerun.h).
#include "core/train/rerun.h"

#include <rapidjson/document.h>

#include <cstdio>
#include <ctime>
#include <map>

#include "core/train/checkpoint_dir.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::train {
namespace {

// Exact keys (or "section." for all of a section) that do not change the trained weights.
const char* const kNeutralKeys[] = {
    "resume",                            // how to continue, not what is trained
    "run.dir",                           // the folder itself
    "run.threads",                       // speed (a resume at another count is not bit for bit: warned)
    "train.log_every",                   // progress lines
    "train.tensorboard",                 // tb/ event files
    "train.eval_every",                  // eval cadence: measured, not trained
    "train.memory_check",                // a check before the run
    "checkpoint.",                       // checkpoint cadence, keep_last, shard size
    "dist.",                             // timeout, backend
    "kernels.",                          // which kernels compute the same math: speed (not bit for bit)
    "data.eval",                         // held-out data: measured, not trained
    "rollout.slots",                     // GRPO's decode batch: speed (seeds are per prompt row)
    "rollout.gpu_memory_fraction",       // how many of those slots fit: speed
    "rollout.cuda_graphs",               // the same decode step, replayed or launched: speed
    "rollout.device_loop",               // the same step on the host or the device: speed
    "grpo.log_rollouts_every",           // rollouts/*.jsonl
    "grpo.reference_device",             // where the frozen reference lives: the same log-probs
    "grpo.reward_urls",                  // where the reward server listens (a pipeline's port changes)
    "grpo.reward_timeout_s",             // connection settings
    "grpo.reward_max_attempts",
    "grpo.reward_api_key",
    "dpo.precompute_ref_log_probs",      // the same reference log-probs, computed once or live
    "dpo.precompute_ref_batch_size",
    "model.lora.save_merged",            // also writing final-merged/: an output, not training
};
// Last key components starting with this are eval-only settings (sft.eval_prompts,
// dpo.eval_micro_batch_size, grpo.eval_num_samples, ...).
const char* const kNeutralLeafPrefix = "eval_";

std::string leaf_of(const std::string& key) {
  size_t dot = key.rfind('.');
  return dot == std::string::npos ? key : key.substr(dot + 1);
}

// Keys whose value is a map option (an object of its own): compared whole, so adding, removing or
// swapping an entry is one change of the key (flattened, a key only one side had went unseen).
bool is_map_option(const std::string& path) { return path == "data.columns"; }

void flatten(const rapidjson::Value& v, const std::string& path, std::map<std::string, std::string>* out) {
  if (v.IsObject() && v.MemberCount() > 0 && !is_map_option(path)) {
    for (auto it = v.MemberBegin(); it != v.MemberEnd(); ++it)
      flatten(it->value, path.empty() ? it->name.GetString() : path + "." + it->name.GetString(), out);
  } else if (!path.empty()) {
    (*out)[path] = json::to_string(v);
  }
}

std::map<std::string, std::string> flat(const std::string& text, const std::string& origin) {
  rapidjson::Document d = json::parse(text, origin);
  if (!d.IsObject()) throw Error(origin + ": a resolved recipe must be a JSON object, got " + json::type_name(d));
  std::map<std::string, std::string> out;
  flatten(d, "", &out);
  return out;
}

bool final_complete(const std::string& run_dir) {
  const std::string f = run_dir + "/final";
  return (path_exists(f + "/config.json") &&
          (path_exists(f + "/model.safetensors") || path_exists(f + "/model.safetensors.index.json"))) ||
         // LoRA: a PEFT adapter folder (core/checkpoint/adapter_config.h)
         (path_exists(f + "/adapter_config.json") && path_exists(f + "/adapter_model.safetensors"));
}

std::string list_changes(const std::vector<RecipeChange>& changes) {
  std::string s;
  for (const auto& c : changes) s += "\n  " + c.key + ": " + c.saved + " → " + c.now;
  return s;
}

}  // namespace

bool changes_training(const std::string& key) {
  if (key == "data.eval_split") return true;  // moves records between the training and held-out sides
  for (const char* k : kNeutralKeys) {
    const std::string n = k;
    if (n.back() == '.' ? key.rfind(n, 0) == 0 : key == n || key.rfind(n + ".", 0) == 0) return false;
  }
  return leaf_of(key).rfind(kNeutralLeafPrefix, 0) != 0;
}

bool sets_length(const std::string& key) { return key == "train.max_steps" || key == "train.epochs"; }

std::string training_neutral_keys() {
  std::string s;
  for (const char* k : kNeutralKeys) s += (s.empty() ? "" : ", ") + std::string(k) + (std::string(k).back() == '.' ? "*" : "");
  return s + ", and every *.eval_* key";
}

// train.zero1=true is the older spelling of train.sharding=zero1: compared as the mode it means, so a
// run started with one spelling resumes under the other.
void resolve_sharding_spelling(std::map<std::string, std::string>* m) {
  auto z = m->find("train.zero1");
  if (z == m->end() || z->second != "true") return;
  z->second = "false";
  (*m)["train.sharding"] = "\"zero1\"";
}

std::vector<RecipeChange> recipe_changes(const std::string& saved_json, const std::string& now_json) {
  auto saved = flat(saved_json, "saved recipe"), now = flat(now_json, "this run's recipe");
  resolve_sharding_spelling(&saved);
  resolve_sharding_spelling(&now);
  std::vector<RecipeChange> out;
  for (const auto& [key, value] : saved) {
    auto it = now.find(key);
    if (it == now.end() || it->second == value) continue;
    out.push_back({key, value, it->second});
  }
  return out;
}

std::string finished_marker(const std::string& run_dir) { return run_dir + "/finished.json"; }

void write_finished_marker(const std::string& run_dir, int64_t step, int64_t total_steps) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
  write_file_atomic(finished_marker(run_dir), "{\"step\": " + std::to_string(step) + ", \"total_steps\": " +
                                                  std::to_string(total_steps) + ", \"final\": \"final\", \"at\": \"" +
                                                  when + "\"}\n");
}

void clear_finished_marker(const std::string& run_dir) { std::remove(finished_marker(run_dir).c_str()); }

int64_t finished_step(const std::string& run_dir) {
  const std::string m = finished_marker(run_dir);
  if (!path_exists(m) || !final_complete(run_dir)) return -1;
  try {
    auto d = json::parse_file(m);
    if (d.IsObject() && d.HasMember("step") && d["step"].IsInt64()) return d["step"].GetInt64();
  } catch (const Error&) {
  }
  return -1;
}

void check_rerun(const std::string& run_dir, const std::string& resume, const std::string& resolved,
                 const std::string& label, void (*log)(const std::string&)) {
  if (resume == "never" || resolved.empty()) return;
  const std::string ways =
      "\n---> HINT: to train this recipe from step 0 in this folder: resume=never (the new run replaces its "
      "checkpoints and final/ as it writes them); to keep that run: another folder, run.dir=" + run_dir +
      "-2 (or any new path). Keys that never block a resume: " + training_neutral_keys() + ".";
  if (resume != "auto") {
    // An explicit checkpoint: its own recipe is what it was trained with.
    const std::string saved_file = resume + "/trainer_state/recipe.json";
    if (!path_exists(saved_file)) return;  // the trainer refuses a folder that is not a checkpoint
    std::vector<RecipeChange> blocking;
    for (auto& c : recipe_changes(read_file(saved_file), resolved))
      if (changes_training(c.key) && !sets_length(c.key)) blocking.push_back(c);
    if (!blocking.empty())
      throw Error("resume=" + resume + ": this checkpoint was trained with another recipe; " +
                  std::to_string(blocking.size()) + " setting" + (blocking.size() == 1 ? "" : "s") +
                  " that change training differ (key: checkpoint → now):" + list_changes(blocking) +
                  "\nResuming would continue its optimizer state and data order under the new settings." + ways +
                  " To start from its weights with the new settings: model.path=" + resume + " resume=never.");
    return;
  }
  const int64_t done_at = finished_step(run_dir);
  // (CheckpointDir creates its folder: only look when there is one, so the check writes nothing.)
  const std::string latest =
      path_exists(run_dir + "/checkpoints") ? CheckpointDir(run_dir + "/checkpoints", 1).latest() : std::string();
  // What the folder's run was trained with: config.json for a finished run (final/ is the result),
  // else the newest checkpoint's own recipe (what resume=auto would continue).
  std::string saved_file, what;
  if (done_at >= 0 && path_exists(run_dir + "/config.json")) {
    saved_file = run_dir + "/config.json";
    what = "the finished run's (" + saved_file + ")";
  } else if (!latest.empty() && path_exists(latest + "/trainer_state/recipe.json")) {
    saved_file = latest + "/trainer_state/recipe.json";
    what = "its checkpoint " + latest + "'s";
  } else {
    return;  // nothing to resume or to lose: a fresh start
  }
  std::vector<RecipeChange> changes = recipe_changes(read_file(saved_file), resolved);
  std::vector<RecipeChange> blocking, length;
  for (auto& c : changes) {
    if (!changes_training(c.key)) continue;
    (sets_length(c.key) ? length : blocking).push_back(c);
  }
  // A longer (or shorter) run continues from a checkpoint; without one there is nothing to continue.
  if (!length.empty() && latest.empty()) blocking.insert(blocking.end(), length.begin(), length.end());
  if (!blocking.empty()) {
    std::string msg = "run folder " + run_dir + " holds a run (ptk " + label + ") of another recipe: " +
                      std::to_string(blocking.size()) + " setting" + (blocking.size() == 1 ? "" : "s") +
                      " that change training differ from " + what + " (key: saved → now):" + list_changes(blocking);
    if (done_at >= 0 && latest.empty() && blocking.size() == length.size())
      msg += "\nThat run finished at step " + std::to_string(done_at) + " and left no checkpoint to continue from.";
    else
      msg += "\nResuming would continue that run's optimizer state and data order under the new settings.";
    throw Error(msg + ways);
  }
  if (done_at >= 0 && length.empty()) {
    throw RunAlreadyFinished(
        label + " run " + run_dir + " finished at step " + std::to_string(done_at) + " with this recipe; final/ is at " +
        run_dir + "/final. Nothing to train.\nTo train again: resume=never (from step 0, in this folder) or "
        "run.dir=<a new folder>; to train longer: a larger train.max_steps or train.epochs (continues from the "
        "newest checkpoint, when checkpoint.every kept one).");
  }
  for (const auto& c : length)
    log(label + ": " + c.key + " changed " + c.saved + " → " + c.now + ": continuing from " + latest +
        " to the new length (the learning-rate schedule follows the new total)");
}

}  // namespace ptk::train
