// One training run as `ptk pipeline` and `ptk sweep` drive it: the child command line
// (`ptk <command> --recipe R <overrides> run.dir=D`), its fingerprint (the merged recipe plus what
// it was fed), the stamp that says whether its final/ is done for that fingerprint, the held-out
// eval through `ptk eval`, and the last metrics of its metrics.jsonl. Not the stage itself: the
// child process trains, checkpoints and resumes (resume=auto) on its own.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ptk::pipeline {

// The training commands a pipeline or sweep may run (a closed set).
const std::vector<std::string>& stage_commands();

// Held-out accuracy settings (`ptk eval` flags); disabled when `data` is empty.
struct EvalSpec {
  std::string data;          // RL-format JSONL with prompt and answer
  std::string verifier = "math";
  int64_t max_new_tokens = 0;  // 0 = ptk eval's default
  int64_t limit = 0;           // first N prompts; 0 = all
  bool enabled() const { return !data.empty(); }
  std::string key() const;     // identifies the settings in stamps
};

struct StageRun {
  std::string label;                   // output prefix and table row name
  std::string command;                 // sft | dpo | rm | grpo
  std::string recipe;                  // the stage recipe file
  std::vector<std::string> overrides;  // key=value: the user's, then the caller's (model.path, ...)
  std::string run_dir;                 // run.dir passed to the child
  std::string upstream;                // fingerprints this run depends on (inputs), "" = none
  // Computed by fingerprint(): the merged recipe JSON + command + upstream (not the reward URL).
  std::string fingerprint;
};

// Loads the recipe with its overrides (throws ptk::Error for a bad file or override) and sets
// run.fingerprint. `volatile_keys` are overrides left out (e.g. a reward server's random port).
void compute_fingerprint(StageRun& run, const std::vector<std::string>& volatile_keys = {});
// Short stable hash of a string (FNV-1a 64, hex), for messages and upstream chains.
std::string short_hash(const std::string& s);

// final/ holds a complete HF folder (config.json and safetensors weights).
bool final_complete(const std::string& run_dir);

enum class RunState {
  kNew,      // nothing there yet
  kResume,   // started with this fingerprint and not finished: rerun (resume=auto continues)
  kChanged,  // the folder holds a run of another fingerprint (or not from a pipeline/sweep)
  kDone,     // finished with this fingerprint, final/ complete: skip
};
RunState inspect(const StageRun& run);
const char* state_name(RunState s);

// Moves a folder holding a run of another recipe to <run_dir>.old-N (first free N) so the new run
// starts clean (stale checkpoints would otherwise be picked up by resume=auto); returns the new path.
std::string set_aside(const std::string& run_dir);

// <run_dir>/ptk_stamp.json: {"fingerprint", "state": "started"|"done", "seconds", "eval": {...}}.
void write_stamp(const StageRun& run, const std::string& state, double seconds);
// Seconds recorded for a finished run (NaN when unknown).
double stamp_seconds(const std::string& run_dir);

// The child's argv: ptk <command> --recipe R [--threads T] <overrides> run.dir=D [extra...].
std::vector<std::string> stage_argv(const std::string& ptk, const StageRun& run, int threads,
                                    const std::vector<std::string>& extra = {});

// Runs `argv` (a stage_argv or a reward server's) with --check appended, its output prefixed by
// `label`: the command validates its recipe and overrides and runs nothing. True when it accepts them.
bool check_command(const std::vector<std::string>& argv, const std::string& label);

// Held-out accuracy of `model_dir` through `ptk eval` as a child (output prefixed by `label`),
// results in <run_dir>/heldout_eval.json. Reused from the stamp when it matches the run's
// fingerprint and `eval.key()`. Returns NaN (with a message) when the eval fails.
double heldout_accuracy(const std::string& ptk, const StageRun& run, const EvalSpec& eval, int threads,
                        const std::string& label);

// Last finite value of each metric in <run_dir>/metrics.jsonl (empty when there is none).
std::map<std::string, double> last_metrics(const std::string& run_dir);

// The held-out figures a stage logged before its first step (<run_dir>/eval_start.json, keys as in
// metrics.jsonl, e.g. eval/accuracy); empty when there is none or it does not parse.
std::map<std::string, double> start_metrics(const std::string& run_dir);

// Formats a number for tables: 4 significant digits, "—" for NaN.
std::string fmt(double v);

}  // namespace ptk::pipeline
