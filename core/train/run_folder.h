// A run folder's owner lock and the cleanup of what crashed writers left in it: temporary folders
// of checkpoints (checkpoints/.tmp-step-N), of final/ (final.tmp, final.tmp.tmp-<pid>), of prepared
// data (data/train.tmp-<pid>) and atomic-write temporaries (*.tmp.<pid>) that no later run would
// otherwise remove (hundreds of GB for a 72B model, and a full disk fails the next run at once).
// Not the writers themselves (checkpoint_dir.h, core/checkpoint, datasets/prepare.h): each of them
// also removes its own temporary when it fails.
//
// Ownership: a training command's rank 0 holds its run folder's lock (flock on <dir>/.ptk-run.lock)
// from its first step until the process ends, however it ends (the kernel drops the lock of a
// killed process). Holding it proves no other ptk process, on this host or any host that shares the
// folder with working locks, is writing the folder; that is what lets a temporary without a pid in
// its name (.tmp-step-N, final.tmp) be removed. A pid in a name is only trusted on this host: one
// still alive here keeps its temporary even under the lock (a pid reused by an unrelated process
// only delays the cleanup). Threading: one caller per folder; no LibTorch.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ptk {

class RunFolderLock {
 public:
  enum class State {
    kHeld,         // this object holds the lock
    kBusy,         // another process holds it (holder() says who)
    kUnsupported,  // the file system refuses locks (error() says why); nothing is known
  };
  // Tries once without waiting; creates `dir` and its lock file when missing. Throws ptk::Error when
  // the lock file cannot be created.
  explicit RunFolderLock(const std::string& dir);
  ~RunFolderLock();  // releases a held lock
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

  State state() const { return state_; }
  // kBusy: the holder's note ("pid 123 on host h since 2026-12-07T06:10:00Z"), "" if it wrote none.
  const std::string& holder() const { return holder_; }
  const std::string& error() const { return error_; }
  static std::string lock_path(const std::string& dir) { return dir + "/.ptk-run.lock"; }

 private:
  int fd_ = -1;
  State state_ = State::kUnsupported;
  std::string holder_, error_;
};

// One temporary found by clean_leftovers.
struct Leftover {
  enum class Action { kRemoved, kKept, kFailed } action = Action::kKept;
  std::string path;
  uint64_t bytes = 0;  // apparent size of the files below it
  std::string why;     // kKept: why it stays; kFailed: the error
};

// Temporaries in `dir`, dir/checkpoints, dir/data, dir/plots and dir/rollouts that ptk's writers name
// (see the top of this file), removed when their writer is dead: with `locked` (the caller holds
// dir's RunFolderLock) all except those whose pid in the name is alive on this host (this process's
// own pid counts as dead: call this before writing anything); without it only those with a pid that
// is dead on this host, so a temporary without a pid stays. "<x>.old" and "<x>.old-<pid>" (a folder
// moved aside while <x> was replaced) are removed only when <x> exists: else they may hold the only
// copy. Never throws for a temporary it cannot remove (kFailed).
std::vector<Leftover> clean_leftovers(const std::string& dir, bool locked);

// "removed leftover run/final.tmp.tmp-4242 (3.2 GiB) of a dead writer" and the like.
std::string describe(const Leftover& l);

// What a training command does first, on rank 0, before writing into its run folder: takes dir's
// lock until the process ends (a second call for the same folder does nothing) and removes the
// leftovers of dead writers, logging one line per leftover through `log` (and a warning when the
// file system has no locks). Throws ptk::Error naming the holder when another process holds the lock.
void claim_run_folder(const std::string& dir, void (*log)(const std::string&));

}  // namespace ptk
