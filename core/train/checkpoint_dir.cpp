#include "core/train/checkpoint_dir.h"

#include <fcntl.h>
#include <stdio.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "core/util/error.h"
#include "core/util/fs.h"

namespace fs = std::filesystem;

namespace ptk {
namespace {
constexpr const char* kDone = "DONE";

// Puts folder `src` at `dst`. When `dst` exists the two are swapped atomically (renameat2
// RENAME_EXCHANGE) and the old one is removed, so `dst` is never missing; filesystems without
// exchange fall back to move-aside-then-rename.
void install_dir(const std::string& src, const std::string& dst) {
  std::error_code ec;
  if (!path_exists(dst)) {
    fs::rename(src, dst, ec);
    if (ec) throw Error("cannot rename " + src + " to " + dst + ": " + ec.message());
  } else if (::renameat2(AT_FDCWD, src.c_str(), AT_FDCWD, dst.c_str(), RENAME_EXCHANGE) == 0) {
    fsync_path(parent_dir(dst));
    fs::remove_all(src, ec);  // now holds the old folder
  } else {
    std::string old = dst + ".old";
    fs::remove_all(old, ec);
    fs::rename(dst, old, ec);
    if (ec) throw Error("cannot move aside " + dst + ": " + ec.message());
    fs::rename(src, dst, ec);
    if (ec) throw Error("cannot rename " + src + " to " + dst + ": " + ec.message());
    fs::remove_all(old, ec);
  }
  fsync_path(parent_dir(dst));
}
}  // namespace

CheckpointDir::CheckpointDir(std::string root, int64_t keep_last) : root_(std::move(root)), keep_last_(keep_last) {
  make_dirs(root_);
}

void sync_tree(const std::string& dir) {
  std::vector<std::string> dirs{dir};
  for (auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) fsync_path(e.path().string());
    else if (e.is_directory()) dirs.push_back(e.path().string());
  }
  for (auto& d : dirs) fsync_path(d);
}

std::string CheckpointDir::temporary(int64_t step) const { return root_ + "/.tmp-step-" + std::to_string(step); }

std::string CheckpointDir::begin(int64_t step) {
  std::string tmp = temporary(step);
  std::error_code ec;
  fs::remove_all(tmp, ec);
  if (ec) throw Error("cannot clear " + tmp + ": " + ec.message());
  make_dirs(tmp);
  return tmp;
}

std::string CheckpointDir::commit(int64_t step) {
  std::string tmp = temporary(step);
  std::string dst = root_ + "/step-" + std::to_string(step);
  PTK_CHECK(path_exists(tmp), "commit(" + std::to_string(step) + ") without begin()");
  write_file_atomic(tmp + "/" + kDone, std::to_string(step) + "\n");
  sync_tree(tmp);
  std::error_code ec;
  install_dir(tmp, dst);  // a resumed run that redoes a step replaces its checkpoint
  write_file_atomic(root_ + "/latest", "step-" + std::to_string(step) + "\n");
  // Pruning first renames a folder out of the step-N namespace (one atomic rename) and only then
  // deletes it: a crash in the middle of remove_all must never leave a `step-N` with DONE but
  // without some of its files.
  auto all = complete();
  for (size_t i = 0; i + static_cast<size_t>(keep_last_) < all.size(); ++i) {
    std::string trash = root_ + "/.trash-" + fs::path(all[i]).filename().string();
    fs::remove_all(trash, ec);
    fs::rename(all[i], trash, ec);
    if (ec) throw Error("cannot retire old checkpoint " + all[i] + ": " + ec.message());
  }
  if (!all.empty()) fsync_path(root_);
  // Leftovers of crashed writes older than this step, and retired folders, are garbage.
  for (auto& e : fs::directory_iterator(root_)) {
    std::string name = e.path().filename().string();
    bool stale_tmp = name.rfind(".tmp-step-", 0) == 0 && std::atoll(name.c_str() + 10) < step;
    if (stale_tmp || name.rfind(".trash-", 0) == 0) fs::remove_all(e.path(), ec);
  }
  return dst;
}

bool CheckpointDir::is_complete(const std::string& dir) { return path_exists(dir + "/" + kDone); }

int64_t CheckpointDir::step_of(const std::string& dir) {
  std::string name = fs::path(dir).filename().string();
  if (name.rfind("step-", 0) != 0 || name.size() == 5) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::atoll(name.c_str() + 5);
}

std::vector<std::string> CheckpointDir::complete() const {
  std::vector<std::pair<int64_t, std::string>> found;
  if (!path_exists(root_)) return {};
  for (auto& e : fs::directory_iterator(root_)) {
    if (!e.is_directory()) continue;
    int64_t s = step_of(e.path().string());
    if (s >= 0 && is_complete(e.path().string())) found.emplace_back(s, e.path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [s, p] : found) out.push_back(p);
  return out;
}

std::string CheckpointDir::latest() const {
  // `latest` is a hint; the scan is the truth (a crash between rename and the `latest` update
  // leaves a newer complete folder that the scan finds).
  auto all = complete();
  return all.empty() ? "" : all.back();
}

void replace_dir_atomic(const std::string& tmp, const std::string& dst) {
  sync_tree(tmp);
  install_dir(tmp, dst);
}

}  // namespace ptk
