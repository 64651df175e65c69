// Safe reruns: what a training command decides about its run folder before it prepares data, loads
// a model or writes a single file there. A folder whose run finished with this recipe says so and
// stops (exit 0); a folder whose checkpoints were trained with another recipe refuses to resume,
// listing the differences (key: saved -> now) and the ways out; otherwise the run starts or resumes.
// Not the resume itself (trainer.cpp), not the folder's lock and leftovers (run_folder.h).
//
// What counts as a difference: every key of the resolved recipe (config.json, or a checkpoint's
// trainer_state/recipe.json) whose value differs, except the keys that do not change the trained
// weights (training_neutral_keys(): threads, logging, checkpoint and eval cadence, eval-only
// settings, how the DPO reference is computed, connection settings) and the keys that set the run's
// length (train.max_steps, train.epochs), which may change when there is a checkpoint to continue
// from (a longer run resumes; DESIGN's "rerun with more steps"). A key only one side has (a recipe
// written by another ptk version) is not compared. No LibTorch; reads files only.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ptk::train {

// Thrown when the run folder holds a finished run of this recipe: what() is the message to print.
// Not a ptk::Error: the command has nothing to do and exits 0 (apps/ptk/main.cpp).
class RunAlreadyFinished : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RecipeChange {
  std::string key;    // "optim.lr"
  std::string saved;  // JSON text of the saved value
  std::string now;    // JSON text of this run's value
};

// Keys (exact, or a whole section ending in '.') and key-name prefixes whose change leaves the
// trained weights as they are.
bool changes_training(const std::string& key);
// train.max_steps and train.epochs: the run's length.
bool sets_length(const std::string& key);
// The neutral keys, for messages and --help ("run.threads, train.log_every, ...").
std::string training_neutral_keys();

// Leaf-by-leaf differences of two resolved recipes (JSON objects; lists compare whole), keys
// present in both only, in key order. Throws ptk::Error when either does not parse as an object.
std::vector<RecipeChange> recipe_changes(const std::string& saved_json, const std::string& now_json);

// <run_dir>/finished.json: written by the trainer after final/ ({"step": N, "total_steps": N}),
// removed when a run starts training in the folder.
std::string finished_marker(const std::string& run_dir);
void write_finished_marker(const std::string& run_dir, int64_t step, int64_t total_steps);
void clear_finished_marker(const std::string& run_dir);
// Step recorded in finished.json when final/ is complete beside it; -1 otherwise.
int64_t finished_step(const std::string& run_dir);

// The check a training command makes first (from_recipe.cpp's trainer_options, every rank):
// `resume` is the recipe's (auto | never | a checkpoint folder), `resolved` this run's resolved
// recipe, `label` the command (sft, dpo, ...). Does nothing for resume=never or an empty folder.
// Throws RunAlreadyFinished for a finished run of this recipe, ptk::Error for a folder (or
// checkpoint) trained with another recipe; logs the length changes it lets through via `log`.
void check_rerun(const std::string& run_dir, const std::string& resume, const std::string& resolved,
                 const std::string& label, void (*log)(const std::string&));

}  // namespace ptk::train
