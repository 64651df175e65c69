// Test helpers: temporary folders, paths to the source tree, ../shared and the ptk binary, and
// running a command. Not assertions (GoogleTest's).
#pragma once
#include <gtest/gtest.h>

#include <functional>
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
// ../shared beside the checkout, or "" when absent (tests using it skip with PTK_SKIP_WITHOUT("shared")).
std::string shared_dir();
// The Python of the project's .venv (scripts/setup.sh), where the references live (tokenizers,
// transformers), or "" when there is none. Tests that need a reference skip without it (PTK_SKIP_WITHOUT("venv")).
std::string reference_python();
// Qwen's tokenizer.json (~11 MB, not committed): assets/tokenizers/qwen (scripts/setup.sh copies it
// there) or ../shared/tokenizers/qwen; "" when neither has it.
std::string qwen_tokenizer_json();

// Whether $PTK_REQUIRE (comma-separated names) lists `resource`. scripts/test.sh lists what set-up
// installed and the machine has (venv, qwen-tokenizer, shared, avx512, procfs, thp, gpu), so that a test
// which would skip for want of one of them fails instead: a skip of something the run is meant to
// cover must not pass unseen.
bool required(const char* resource);
// "[resource]", or the failure's first line when required(resource).
std::string skip_label(const char* resource);

}  // namespace ptk::test

// Skips the test for want of `resource` (one of the names above) with the streamed reason, or fails
// it when PTK_REQUIRE lists that resource:  if (dir.empty()) PTK_SKIP_WITHOUT("shared") << "...";
// (One statement, like GTEST_SKIP(): returns from the test body.)
#define PTK_SKIP_WITHOUT(resource)                                                                  \
  return ::testing::internal::AssertHelper(::ptk::test::required(resource)                         \
                                               ? ::testing::TestPartResult::kFatalFailure           \
                                               : ::testing::TestPartResult::kSkip,                  \
                                           __FILE__, __LINE__, ::ptk::test::skip_label(resource).c_str()) = \
             ::testing::Message()

namespace ptk::test {

struct RunResult {
  int exit_code;
  std::string out;  // stdout and stderr together
};
RunResult run(const std::string& command);

// Makes a FIFO (named pipe) at `path`; returns `path`.
std::string make_fifo(const std::string& path);
// Runs `fn` on another thread and returns what it threw (what()), or "" when it returned. For
// readers that must refuse the FIFO at `fifo` before open() can block: when `fn` has not returned
// within `seconds`, the FIFO is opened for writing (which releases a reader blocked in open(), so
// the test fails instead of hanging) and the result starts with "HUNG: ".
std::string error_within(const std::function<void()>& fn, const std::string& fifo, double seconds = 30);

}  // namespace ptk::test
