// GoogleTest main shared by every test executable. Besides running the tests it
//  - keeps child-process bodies out of an ordinary run: suites whose name ends in "Worker" (the rank
//    bodies of multi-process tests, started by tests/parallel/spawn.h with PTK_TEST_CHILD=1 and an empty
//    PTK_TEST_RESULTS_DIR) run only in such a child, so they neither pass nor skip in the parent's count;
//  - writes one line per test to $PTK_TEST_RESULTS_DIR/<executable>.tsv (status, test, skip reason),
//    which scripts/test_summary.sh adds up into the suite's summary (passed / skipped with reasons /
//    failed); ctest itself only sees one pass or fail per executable;
//  - prints kAllSkipped when every test that ran skipped, which ctest's SKIP_REGULAR_EXPRESSION turns
//    into "Skipped" (cmake/PtkHelpers.cmake) instead of "Passed".
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

namespace {

constexpr const char* kAllSkipped = "ptk-test: every test of this executable skipped";

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\t' || c == '\r') c = ' ';
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// The message of a skip (GTEST_SKIP() << "..."), without gtest's "Skipped" prefix line.
std::string skip_reason(const testing::TestResult& r) {
  for (int i = 0; i < r.total_part_count(); ++i) {
    const auto& part = r.GetTestPartResult(i);
    if (part.skipped()) return one_line(part.message());
  }
  return "";
}

class ResultLog : public testing::EmptyTestEventListener {
 public:
  explicit ResultLog(std::string path, std::string exe) : exe_(std::move(exe)) {
    if (path.empty()) return;
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
    out_ = std::make_unique<std::ofstream>(path, std::ios::trunc);
  }
  void OnTestEnd(const testing::TestInfo& t) override {
    const testing::TestResult& r = *t.result();
    const char* status = r.Failed() ? "failed" : r.Skipped() ? "skipped" : "passed";
    ++(r.Failed() ? failed_ : r.Skipped() ? skipped_ : passed_);
    if (!out_) return;
    *out_ << status << '\t' << exe_ << '\t' << t.test_suite_name() << '.' << t.name() << '\t'
          << (r.Skipped() && !r.Failed() ? skip_reason(r) : "") << '\n';
    out_->flush();  // a crash later still leaves the tests that ended
  }
  void OnTestProgramEnd(const testing::UnitTest&) override {
    if (skipped_ > 0 && passed_ == 0 && failed_ == 0) std::printf("%s\n", kAllSkipped);
  }

 private:
  std::string exe_;
  std::unique_ptr<std::ofstream> out_;
  int passed_ = 0, skipped_ = 0, failed_ = 0;
};

std::string base_name(const char* argv0) {
  std::string s = argv0 ? argv0 : "test";
  auto slash = s.rfind('/');
  return slash == std::string::npos ? s : s.substr(slash + 1);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const bool child = std::getenv("PTK_TEST_CHILD") != nullptr;
  if (!child) {
    std::string filter = GTEST_FLAG_GET(filter);
    filter += filter.find('-') == std::string::npos ? "-*Worker.*" : ":*Worker.*";
    GTEST_FLAG_SET(filter, filter);
  }
  const char* dir = std::getenv("PTK_TEST_RESULTS_DIR");
  const std::string exe = base_name(argv[0]);
  // Children are started with an empty PTK_TEST_RESULTS_DIR: their tests belong to the parent's count.
  std::string path = dir && *dir && !GTEST_FLAG_GET(list_tests) ? std::string(dir) + "/" + exe + ".tsv" : "";
  ::testing::UnitTest::GetInstance()->listeners().Append(new ResultLog(path, exe));
  return RUN_ALL_TESTS();
}
