// Crash-safe checkpoint folders: each checkpoint is written into a temporary folder, every file is
// fsynced, a DONE marker is written last, the folder is renamed to checkpoints/step-N, and only then
// does `latest` move. A crash at any moment leaves the previous checkpoint complete and findable.
// Not the content of a checkpoint (the trainer decides what goes in). One writer per run folder.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ptk {

class CheckpointDir {
 public:
  // `root` is the run's checkpoints/ folder; the newest `keep_last` complete checkpoints are kept.
  CheckpointDir(std::string root, int64_t keep_last);

  // Prepares an empty temporary folder for step `step` (removing leftovers of a crashed write)
  // and returns its path; write files into it, then commit().
  std::string begin(int64_t step);
  // The temporary folder of step `step` (what begin returns); a writer that fails removes it.
  std::string temporary(int64_t step) const;
  // Syncs, marks DONE, renames to step-N, moves `latest`, prunes old ones; returns the final path.
  std::string commit(int64_t step);

  // Newest complete checkpoint folder, or "" when none. Ignores incomplete and temporary folders.
  std::string latest() const;
  // Complete checkpoint folders, oldest first.
  std::vector<std::string> complete() const;

  static bool is_complete(const std::string& dir);
  // Step number of a "step-N" folder path, -1 if it is not one.
  static int64_t step_of(const std::string& dir);

 private:
  std::string root_;
  int64_t keep_last_;
};

// Replaces folder `dst` by the complete folder `tmp` (fsynced first): dst is either the old
// folder or the new one after a crash, never a mixture. Used for final/.
void replace_dir_atomic(const std::string& tmp, const std::string& dst);

// fsyncs every regular file below `dir`, then the folders themselves.
void sync_tree(const std::string& dir);

}  // namespace ptk
