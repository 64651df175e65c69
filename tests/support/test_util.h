// Test helpers: temporary folders, paths to the source tree, ../shared and the ptk binary, and
// running a command. Not assertions (GoogleTest's).
#pragma once
#include <string>

namespace ptk::test {

// A fresh folder under $TMPDIR, removed at destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Writes `content` to `name` inside the folder; returns its path.
  std::string write(const std::string& name, const std::string& content) const;

 private:
  std::string path_;
};

std::string source_dir();  // $PTK_SOURCE_DIR
std::string ptk_binary();  // $PTK_BINARY
// ../shared beside the checkout, or "" when absent (tests using it GTEST_SKIP with a message).
std::string shared_dir();

struct RunResult {
  int exit_code;
  std::string out;  // stdout and stderr together
};
RunResult run(const std::string& command);

}  // namespace ptk::test
