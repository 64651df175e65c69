// Input files are regular files: read_file, open_regular_file, check_regular_file and
// json::parse_file refuse a FIFO before open() can block (each check runs on a watched thread, so a
// regression fails the test instead of hanging it), a folder (once read as an empty text: "The
// document is empty"), a missing file, a socket and a device, each naming the path.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

using test::TempDir;

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(RegularFiles, AFifoIsRefusedBeforeOpenBlocks) {
  TempDir d;
  std::string fifo = test::make_fifo(d.file("model.safetensors"));
  const std::string want = "cannot open " + fifo + ": is a FIFO, not a regular file";
  EXPECT_EQ(test::error_within([&] { read_file(fifo); }, fifo), want);
  EXPECT_EQ(test::error_within([&] { ::close(open_regular_file(fifo)); }, fifo), want);
  EXPECT_EQ(test::error_within([&] { check_regular_file(fifo); }, fifo), want);
  EXPECT_EQ(test::error_within([&] { json::parse_file(fifo); }, fifo), want);
  // Through a symlink too (the check follows links, as open() does).
  std::string link = d.file("config.json");
  ASSERT_EQ(::symlink(fifo.c_str(), link.c_str()), 0);
  EXPECT_EQ(test::error_within([&] { read_file(link); }, fifo), "cannot open " + link + ": is a FIFO, not a regular file");
}

TEST(RegularFiles, FolderMissingSocketAndDevice) {
  TempDir d;
  make_dirs(d.file("recipe.json"));
  EXPECT_EQ(error_of([&] { read_file(d.file("recipe.json")); }),
            "cannot open " + d.file("recipe.json") + ": is a directory, not a regular file");
  EXPECT_EQ(error_of([&] { json::parse_file(d.file("recipe.json"), json::Syntax::kRelaxed); }),
            "cannot open " + d.file("recipe.json") + ": is a directory, not a regular file");
  EXPECT_EQ(error_of([&] { check_regular_file(d.path()); }), "cannot open " + d.path() + ": is a directory, not a regular file");
  EXPECT_EQ(error_of([&] { read_file(d.file("config.json")); }), "cannot open " + d.file("config.json") + ": no such file");
  EXPECT_EQ(error_of([&] { check_regular_file(d.file("config.json")); }),
            "cannot open " + d.file("config.json") + ": no such file");
  EXPECT_EQ(error_of([&] { read_file("/dev/null"); }), "cannot open /dev/null: is a character device, not a regular file");

  // A Unix socket cannot be opened at all (ENXIO): still said as what it is.
  std::string sock_path = d.file("s.sock");
  int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(s, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  ASSERT_LT(sock_path.size(), sizeof addr.sun_path);
  std::strcpy(addr.sun_path, sock_path.c_str());
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  EXPECT_EQ(error_of([&] { read_file(sock_path); }), "cannot open " + sock_path + ": is a socket, not a regular file");
  ::close(s);
}

TEST(RegularFiles, RegularFilesReadWhole) {
  TempDir d;
  std::string big(3 << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4097) big[i] = static_cast<char>(i % 251);
  std::string f = d.write("big.bin", big);
  EXPECT_EQ(read_file(f), big);
  EXPECT_EQ(read_file(d.write("empty.json", "")), "");
  EXPECT_NO_THROW(check_regular_file(f));
  // The descriptor is an ordinary blocking one (O_NONBLOCK was only for the open).
  int fd = open_regular_file(f);
  int flags = ::fcntl(fd, F_GETFL);
  int fdflags = ::fcntl(fd, F_GETFD);
  ::close(fd);
  EXPECT_EQ(flags & O_NONBLOCK, 0);
  EXPECT_NE(fdflags & FD_CLOEXEC, 0);
  // A file that reports size 0 but has content (procfs) is read to its end.
  EXPECT_NE(read_file("/proc/self/status").find("Name:"), std::string::npos);
}

}  // namespace
}  // namespace ptk
