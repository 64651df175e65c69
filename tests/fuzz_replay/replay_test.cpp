// Replays a fuzz corpus (PTK_REPLAY_CORPORA, ':'-separated folders) through the harness linked in
// (PTK_REPLAY_HARNESS's LLVMFuzzerTestOneInput), one call per file, as libFuzzer does when given
// files. A crash, an abort from the harness's own checks or a sanitizer report ends the process, and
// ctest reports the test failed; the file being replayed is printed first so the log names it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "tests/support/test_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<std::string> corpus_files() {
  std::vector<std::string> files;
  std::stringstream dirs(PTK_REPLAY_CORPORA);
  std::string dir;
  while (std::getline(dirs, dir, ':'))
    for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
      if (e.is_regular_file()) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

TEST(FuzzReplay, EveryCorpusInputRunsCleanly) {
#ifdef PTK_REPLAY_NEEDS_QWEN
  const std::string tok = ptk::test::qwen_tokenizer_json();
  if (tok.empty()) PTK_SKIP_WITHOUT("qwen-tokenizer") << "no Qwen tokenizer.json: " PTK_REPLAY_HARNESS " not replayed";
  ::setenv("PTK_FUZZ_TOKENIZER", tok.c_str(), 1);
#endif
  const auto files = corpus_files();
  ASSERT_FALSE(files.empty()) << "no corpus files in " << PTK_REPLAY_CORPORA;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::fprintf(stderr, "replay %s (%zu bytes)\n", f.c_str(), bytes.size());
    EXPECT_EQ(LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), 0) << f;
  }
  std::printf("%zu inputs of %s replayed through %s\n", files.size(), PTK_REPLAY_CORPORA, PTK_REPLAY_HARNESS);
}

}  // namespace
