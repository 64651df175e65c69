#include "core/util/fs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/util/error.h"
#include "core/util/strings.h"

namespace ptk {
namespace {
std::string errno_text() { return std::strerror(errno); }

[[noreturn]] void throw_not_regular(const std::string& path, mode_t mode) {
  const char* type = S_ISDIR(mode)    ? "a directory"
                     : S_ISFIFO(mode) ? "a FIFO"
                     : S_ISSOCK(mode) ? "a socket"
                     : S_ISCHR(mode)  ? "a character device"
                     : S_ISBLK(mode)  ? "a block device"
                                      : "a special file";
  throw Error("cannot open " + path + ": is " + type + ", not a regular file");
}

[[noreturn]] void throw_open_failed(const std::string& path, int err) {
  if (err == ENOENT) throw Error("cannot open " + path + ": no such file");
  struct stat st {};
  // A socket cannot be open()ed (ENXIO): say what the path is rather than "No such device".
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) throw_not_regular(path, st.st_mode);
  throw Error("cannot open " + path + ": " + std::strerror(err));
}
}  // namespace

int open_regular_file(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_open_failed(path, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int saved = errno;
    ::close(fd);
    throw Error("cannot stat " + path + ": " + std::strerror(saved));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_not_regular(path, st.st_mode);
  }
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

void check_regular_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw_open_failed(path, errno);
  if (!S_ISREG(st.st_mode)) throw_not_regular(path, st.st_mode);
}

std::string read_file(const std::string& path) {
  int fd = open_regular_file(path);
  struct stat st {};
  size_t size = ::fstat(fd, &st) == 0 && st.st_size > 0 ? static_cast<size_t>(st.st_size) : 0;
  std::string out(size + 1, '\0');  // one spare byte: a read of 0 then confirms the end
  size_t len = 0;
  for (;;) {
    if (len == out.size()) out.resize(out.size() * 2);  // the file grew while being read
    ssize_t n = ::read(fd, &out[len], out.size() - len);
    if (n < 0) {
      if (errno == EINTR) continue;
      int saved = errno;
      ::close(fd);
      throw Error("cannot read " + path + ": " + std::strerror(saved));
    }
    if (n == 0) break;
    len += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(len);
  return out;
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot open " + path + " to sync it: " + errno_text());
  int rc = ::fsync(fd);
  int saved = errno;
  ::close(fd);
  if (rc != 0) throw Error("fsync " + path + " failed: " + std::strerror(saved));
}

void write_file_atomic(const std::string& path, std::string_view data) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw Error("cannot create " + tmp + ": " + errno_text());
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int saved = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error("cannot write " + tmp + ": " + std::strerror(saved));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error("cannot sync " + tmp + ": " + errno_text());
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int saved = errno;
    ::unlink(tmp.c_str());
    throw Error("cannot rename " + tmp + " to " + path + ": " + std::strerror(saved));
  }
  fsync_path(parent_dir(path));
}

void make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) throw Error("cannot create folder " + path + ": " + ec.message());
}

bool path_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

uint64_t tree_bytes(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  auto st = fs::symlink_status(path, ec);
  if (ec) return 0;
  if (fs::is_regular_file(st)) {
    auto n = fs::file_size(path, ec);
    return ec ? 0 : n;
  }
  if (!fs::is_directory(st)) return 0;
  uint64_t total = 0;
  for (auto it = fs::recursive_directory_iterator(path, fs::directory_options::skip_permission_denied, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    std::error_code e2;
    if (it->is_regular_file(e2) && !it->is_symlink(e2)) total += it->file_size(e2);
  }
  return total;
}

std::string remove_partial(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::symlink_status(path, ec)) || ec) return "";
  const std::string size = format_bytes(static_cast<double>(tree_bytes(path)));
  std::filesystem::remove_all(path, ec);
  if (ec) return "could not remove its partial output " + path + " (" + size + "): " + ec.message();
  return "removed its partial output " + path + " (" + size + ")";
}

std::string parent_dir(const std::string& path) {
  auto p = std::filesystem::path(path).parent_path().string();
  return p.empty() ? "." : p;
}

std::string resolve_path(const std::string& base_dir, const std::string& path) {
  if (path.empty() || path[0] == '/') return path;
  return (std::filesystem::path(base_dir) / path).lexically_normal().string();
}

}  // namespace ptk
