// Run folder lock (flock) and the cleanup of crashed writers' temporaries (see run_folder.h).
#include "core/train/run_folder.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <absl/strings/match.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/strings.h"

namespace fs = std::filesystem;

namespace ptk {
namespace {

std::string host_name() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "?";
  return buf;
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

bool all_digits(const std::string& s) {
  if (s.empty() || s.size() > 9) return false;  // pids fit in 9 digits (pid_max <= 4194304)
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// What a name is, when ptk's writers make it as a temporary.
struct Kind {
  bool temporary = false;
  long pid = 0;          // from the name; 0 = none
  std::string moved_of;  // "<x>.old[-pid]": the folder <x> it was moved aside from
};

Kind classify(const std::string& name) {
  Kind k;
  if (name.rfind(".tmp-step-", 0) == 0 || name.rfind(".trash-", 0) == 0 || name == "final.tmp") {
    k.temporary = true;  // checkpoint_dir.cpp's and the trainer's, without a pid
    return k;
  }
  // "<x>.tmp-<pid>" (save_checkpoint, prepare, caches), "<x>.tmp.<pid>" (write_file_atomic),
  // "<x>.old-<pid>" (moved aside by save_checkpoint or prepare), "<x>.old" (install_dir).
  for (const char* mark : {".tmp-", ".tmp.", ".old-"}) {
    size_t at = name.rfind(mark);
    if (at == std::string::npos || at == 0) continue;
    std::string digits = name.substr(at + 5);
    if (!all_digits(digits)) continue;
    k.temporary = true;
    k.pid = std::stol(digits);
    if (std::strcmp(mark, ".old-") == 0) k.moved_of = name.substr(0, at);
    return k;
  }
  if (absl::EndsWith(name, ".old") && name.size() > 4) {
    k.temporary = true;
    k.moved_of = name.substr(0, name.size() - 4);
  }
  return k;
}

bool alive_here(long pid) {
  if (pid <= 0) return false;
  if (pid == static_cast<long>(::getpid())) return false;  // a leftover of an earlier process with our pid
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

}  // namespace

RunFolderLock::RunFolderLock(const std::string& dir) {
  make_dirs(dir);
  const std::string path = lock_path(dir);
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error("cannot create the run folder lock " + path + ": " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) == 0) {
    state_ = State::kHeld;
    std::string note = "pid " + std::to_string(::getpid()) + " on host " + host_name() + " since " + utc_now() + "\n";
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, note.data(), note.size(), 0) != static_cast<ssize_t>(note.size())) {
      // The note is only for the message another process shows; the lock is what counts.
    }
    return;
  }
  int err = errno;
  if (err == EWOULDBLOCK) {
    state_ = State::kBusy;
    char buf[256] = {};
    ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    holder_ = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
    while (!holder_.empty() && (holder_.back() == '\n' || holder_.back() == '\r')) holder_.pop_back();
  } else {
    state_ = State::kUnsupported;
    error_ = std::strerror(err);
  }
  ::close(fd_);
  fd_ = -1;
}

RunFolderLock::~RunFolderLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the only descriptor drops the flock
}

std::vector<Leftover> clean_leftovers(const std::string& dir, bool locked) {
  std::vector<Leftover> out;
  for (const char* sub : {"", "/checkpoints", "/data", "/plots", "/rollouts"}) {
    const fs::path folder = dir + sub;
    std::error_code ec;
    if (!fs::is_directory(folder, ec)) continue;
    std::vector<fs::path> found;
    for (auto it = fs::directory_iterator(folder, ec); !ec && it != fs::directory_iterator(); it.increment(ec))
      found.push_back(it->path());
    for (const fs::path& p : found) {
      const std::string name = p.filename().string();
      Kind k = classify(name);
      if (!k.temporary) continue;
      Leftover l;
      l.path = p.string();
      l.bytes = tree_bytes(l.path);
      std::error_code e2;
      if (k.pid > 0 && alive_here(k.pid)) {
        l.why = "its writer, pid " + std::to_string(k.pid) + ", is alive on this host";
      } else if (k.pid == 0 && !locked) {
        l.why = "no pid in its name and the run folder could not be locked, so a live writer on another host "
                "cannot be ruled out; delete it by hand if no run uses this folder";
      } else if (!k.moved_of.empty() && !fs::is_directory(p, e2)) {
        continue;  // "<x>.old" that is a file: not something ptk moves aside
      } else if (!k.moved_of.empty() && !fs::exists(folder / k.moved_of, e2)) {
        l.why = "the folder it was moved aside from, " + (folder / k.moved_of).string() +
                ", is missing: it may hold the only copy";
      } else {
        fs::remove_all(p, e2);
        if (e2) {
          l.action = Leftover::Action::kFailed;
          l.why = e2.message();
        } else {
          l.action = Leftover::Action::kRemoved;
        }
      }
      out.push_back(std::move(l));
    }
  }
  return out;
}

std::string describe(const Leftover& l) {
  const std::string size = format_bytes(static_cast<double>(l.bytes));
  switch (l.action) {
    case Leftover::Action::kRemoved: return "removed leftover " + l.path + " (" + size + ") of a run that crashed or was killed";
    case Leftover::Action::kKept: return "kept leftover " + l.path + " (" + size + "): " + l.why;
    case Leftover::Action::kFailed: return "could not remove leftover " + l.path + " (" + size + "): " + l.why;
  }
  return l.path;
}

void claim_run_folder(const std::string& dir, void (*log)(const std::string&)) {
  static std::mutex mu;
  static std::map<std::string, std::unique_ptr<RunFolderLock>> held;  // until the process ends
  std::lock_guard<std::mutex> guard(mu);
  make_dirs(dir);
  std::error_code ec;
  std::string key = fs::weakly_canonical(dir, ec).string();
  if (ec) key = dir;
  if (held.count(key)) return;
  auto lock = std::make_unique<RunFolderLock>(dir);
  if (lock->state() == RunFolderLock::State::kBusy)
    throw Error("run folder " + dir + " is in use by another ptk process (" +
                (lock->holder().empty() ? std::string("holder unknown") : lock->holder()) + "; lock " +
                RunFolderLock::lock_path(dir) + ")\n---> HINT: two runs in one folder would overwrite each other's "
                "checkpoints; wait for that run to end, stop it, or give this run another run.dir");
  if (lock->state() == RunFolderLock::State::kUnsupported)
    log("WARNING: cannot lock run folder " + dir + " (" + lock->error() +
        "): leftovers of crashed runs are removed only when their pid is dead on this host");
  uint64_t freed = 0;
  int removed = 0;
  for (const Leftover& l : clean_leftovers(dir, lock->state() == RunFolderLock::State::kHeld)) {
    log((l.action == Leftover::Action::kRemoved ? "" : "WARNING: ") + describe(l));
    if (l.action == Leftover::Action::kRemoved) {
      freed += l.bytes;
      ++removed;
    }
  }
  if (removed > 1)
    log("run folder " + dir + ": removed " + std::to_string(removed) + " leftovers, " +
        format_bytes(static_cast<double>(freed)) + " in all");
  held.emplace(key, std::move(lock));
}

}  // namespace ptk
