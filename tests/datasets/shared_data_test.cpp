// The real sets in ../shared/data (mapped to docs/DESIGN.md's formats by shared_data.cpp) through every
// reader and prepare, with the Qwen tokenizer when assets/tokenizers/qwen is set up (else the
// byte-level one); and the raw files, unmapped, fed to a reader to show the errors a user sees.
// Skips with a message when ../shared/data is absent.
#include <gtest/gtest.h>

#include <iostream>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "tests/datasets/shared_data.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

std::string data_dir() {
  std::string s = test::shared_dir();
  return s.empty() || !path_exists(s + "/data/README.md") ? "" : s + "/data";
}

TEST(SharedData, EveryMappedSetThroughItsReader) {
  std::string d = data_dir();
  if (d.empty()) PTK_SKIP_WITHOUT("shared") << "../shared/data not found (PTK_SHARED_DIR): real-data reader test skipped";
  test::TempDir tmp;
  std::string tok = test::source_dir() + "/assets/tokenizers/qwen";
  std::string templ = "qwen2.5";
  if (!path_exists(tok + "/tokenizer.json")) {
    std::cerr << "note: " << tok << " absent (scripts/setup.sh puts it there); using the byte-level tokenizer\n";
    tasks::write_byte_tokenizer(tmp.file("tok"));
    tok = tmp.file("tok");
    templ = "chatml";
  }
  auto sets = test::map_shared_data(d);
  ASSERT_GE(sets.size(), 25u);
  int64_t total = 0;
  for (const auto& set : sets) {
    SCOPED_TRACE(set.name);
    ASSERT_FALSE(set.lines.empty());
    std::string text;
    for (const auto& l : set.lines) text += l + "\n";
    std::string file = tmp.write(set.name + ".jsonl", text);
    PrepareOptions o;
    o.format = set.format;
    o.sources = {{file, 1.0}};
    o.tokenizer_path = tok;
    o.chat_template = templ;
    o.max_seq_len = 4096;
    o.quiet = true;
    o.on_error = "skip";
    auto r = prepare(o, tmp.file("out/" + set.name));
    std::cout << set.name << " (" << format_name(set.format) << ", " << set.source << "): " << summary_line(r) << "\n";
    EXPECT_EQ(r.summary.read, static_cast<int64_t>(set.lines.size()));
    // Real bad records, reported and skipped: BELLE's eval set has 369 empty reference answers, and
    // one ShareGPT conversation has no assistant turn.
    int64_t expect_skipped = set.name == "sft/belle_eval" ? 369 : set.name == "sft/sharegpt_zh" ? 1 : 0;
    EXPECT_EQ(r.summary.skipped, expect_skipped) << read_file(tmp.file("out/" + set.name + "/skipped.txt"));
    if (set.name == "sft/sharegpt_zh") {
      EXPECT_EQ(read_file(tmp.file("out/" + set.name + "/skipped.txt")),
                file + ":781: no assistant message in \"messages\" (nothing to train on)\n");
    }
    EXPECT_GT(r.summary.docs, 0);
    EXPECT_GT(r.summary.tokens, 0);
    auto ps = PreparedSet::open(tmp.file("out/" + set.name));
    Loader l(ps, {4, 0, 1, 1});
    auto rows = l.next_rows();
    if (set.format == Format::kSft) {
      auto b = make_sft_batch(ps, rows, 0);
      EXPECT_GT(b.targets, 0);
    } else if (set.format == Format::kPreference) {
      for (const auto& p : make_preference_batch(ps, rows)) {
        EXPECT_GT(p.chosen.size, 0u);
        EXPECT_GT(p.rejected.size, 0u);
      }
    } else {
      for (const auto& p : make_rl_batch(ps, rows)) {
        EXPECT_FALSE(p.answer.empty()) << p.record_json;
        EXPECT_GT(p.ids.size, 0u);
      }
    }
    total += r.summary.read;
  }
  std::cout << total << " records in " << sets.size() << " mapped sets\n";
  for (const auto& u : test::unmapped_shared_files()) std::cout << "not mapped: " << u << "\n";
}

TEST(SharedData, RawFilesGiveFileLineReasons) {
  std::string d = data_dir();
  if (d.empty()) PTK_SKIP_WITHOUT("shared") << "../shared/data not found (PTK_SHARED_DIR): real-data reader test skipped";
  test::TempDir tmp;
  tasks::write_byte_tokenizer(tmp.file("tok"));
  PrepareOptions o;
  o.format = Format::kRl;
  o.sources = {{d + "/math/gsm8k/test.jsonl", 1.0}};
  o.tokenizer_path = tmp.file("tok");
  o.quiet = true;
  try {
    prepare(o, tmp.file("out"));
    FAIL() << "GSM8K's own fields (question, answer) are not an rl record";
  } catch (const Error& e) {
    std::string msg = e.what();
    // Every record failing for one reason is a file-level problem, reported once with the fix.
    EXPECT_NE(msg.find(d + "/math/gsm8k/test.jsonl: all 1319 records read (from " + d +
                       "/math/gsm8k/test.jsonl:1) are refused: missing field \"prompt\""),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("data.columns"), std::string::npos) << msg;
  }
  // With the column mapping the same file is an rl dataset.
  o.columns = {{"prompt", "question"}};
  auto mapped = prepare(o, tmp.file("out-mapped"));
  EXPECT_EQ(mapped.summary.read, 1319);
  EXPECT_EQ(mapped.summary.skipped, 0);
  // The LIMA file is one JSON array of Alpaca records: read as such, every record kept.
  o.columns.clear();
  o.format = Format::kSft;
  o.sources = {{d + "/sft/lima/lima.json", 1.0}};
  auto lima = prepare(o, tmp.file("out-lima"));
  EXPECT_EQ(lima.summary.read, 1029);
  EXPECT_EQ(lima.summary.skipped, 0);
}

}  // namespace
}  // namespace ptk::data
