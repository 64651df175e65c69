// `ptk generate` end to end on the HF fixture checkpoint: greedy ids equal transformers', output
// lines in input order with G per input, logprobs per id, finish_reason, bad input refused.
// Not the engine's numerics (rollout_engine_test).
#include <gtest/gtest.h>

#include <fstream>

#include "core/util/fs.h"
#include "tests/model/hf_fixture.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

using test::fixture_dir;

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

using test::ints;

TEST(GenerateCommand, GreedyIdsEqualTransformers) {
  test::TempDir tmp;
  auto e = test::expected_json("tiny-tied");
  std::string input;
  for (const auto& g : e["generation"].GetArray()) input += "{\"prompt_ids\": " + json::to_string(g["prompt_ids"]) + "}\n";
  auto in = tmp.write("prompts.jsonl", input);
  auto r = test::run(test::ptk_binary() + " generate --threads 1 --model " + fixture_dir("tiny-tied") +
                     "/checkpoint --input " + in + " --output " + tmp.file("out.jsonl") +
                     " --temperature 0 --max-new-tokens 12 --slots 2");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("tokens/s"), std::string::npos) << r.out;
  auto lines = lines_of(tmp.file("out.jsonl"));
  ASSERT_EQ(lines.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    auto d = json::parse(lines[i], "out.jsonl");
    EXPECT_EQ(ints(d["ids"]), ints(e["generation"][static_cast<rapidjson::SizeType>(i)]["new_ids"])) << "line " << i;
    EXPECT_EQ(d["logprobs"].Size(), 12u);
    EXPECT_STREQ(d["finish_reason"].GetString(), "length");
    EXPECT_FALSE(d.HasMember("text"));  // the fixture folder has no tokenizer
  }
}

TEST(GenerateCommand, SamplesComeGPerInputInOrderAndAreReproducible) {
  test::TempDir tmp;
  auto in = tmp.write("p.jsonl", "{\"prompt_ids\": [469, 148, 85]}\n\n{\"prompt_ids\": [325]}\n");
  auto cmd = [&](const std::string& out, const std::string& extra) {
    return test::run(test::ptk_binary() + " generate --threads 1 --model " + fixture_dir("tiny-untied") +
                     "/checkpoint --input " + in + " --output " + tmp.file(out) +
                     " --samples 3 --max-new-tokens 5 --temperature 1.0 --top-k 50 --seed 11 " + extra);
  };
  auto a = cmd("a.jsonl", "--slots 4");
  ASSERT_EQ(a.exit_code, 0) << a.out;
  auto b = cmd("b.jsonl", "--slots 1");  // another batch shape, same seeds
  ASSERT_EQ(b.exit_code, 0) << b.out;
  auto la = lines_of(tmp.file("a.jsonl")), lb = lines_of(tmp.file("b.jsonl"));
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    auto da = json::parse(la[i], "a"), db = json::parse(lb[i], "b");
    EXPECT_EQ(ints(da["ids"]), ints(db["ids"])) << "line " << i;
    EXPECT_EQ(da["ids"].Size(), 5u);
    EXPECT_EQ(da["logprobs"].Size(), 5u);
    for (const auto& lp : da["logprobs"].GetArray()) EXPECT_LE(lp.GetDouble(), 0.0);
  }
  EXPECT_NE(ints(json::parse(la[0], "a")["ids"]), ints(json::parse(la[1], "a")["ids"]));
}

TEST(GenerateCommand, TextNeedsATokenizerAndBadLinesSayWhere) {
  test::TempDir tmp;
  auto in = tmp.write("p.jsonl", "{\"prompt_ids\": [3]}\n{\"prompt\": \"hello\"}\n");
  auto r = test::run(test::ptk_binary() + " generate --model " + fixture_dir("tiny-tied") + "/checkpoint --input " + in +
                     " --output " + tmp.file("o.jsonl"));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("p.jsonl:2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no tokenizer.json"), std::string::npos) << r.out;
  auto in2 = tmp.write("q.jsonl", "{\"prompt_ids\": [3, 600]}\n");
  r = test::run(test::ptk_binary() + " generate --model " + fixture_dir("tiny-tied") + "/checkpoint --input " + in2 +
                " --output " + tmp.file("o.jsonl"));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("outside the model's vocabulary"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(tmp.file("o.jsonl")));
}

TEST(GenerateCommand, FolderWithTokenizerWritesText) {
  // make-data's 259-id byte-level tokenizer fits the fixture's 512 embedding rows (generate refuses a
  // tokenizer with more ids than the model's vocab_size, as the training stages do).
  test::TempDir tmp;
  const std::string dir = tmp.file("model");
  ASSERT_EQ(test::run(test::ptk_binary() + " make-data arithmetic --out " + tmp.file("data") +
                      " --train 2 --eval 1 --tokenizer bytes").exit_code, 0);
  ASSERT_EQ(test::run("mkdir -p " + dir + " && cp " + fixture_dir("tiny-tied") + "/checkpoint/* " + dir + " && cp " +
                      tmp.file("data/tokenizer.json") + " " + tmp.file("data/tokenizer_config.json") + " " + dir + "/")
                .exit_code, 0);
  // Ids 40..42 are the bytes '(', ')', '*' (the byte tokenizer's ids 0..255 are the bytes).
  auto in = tmp.write("p.jsonl", "{\"prompt_ids\": [40, 41, 42]}\n");
  auto r = test::run(test::ptk_binary() + " generate --threads 1 --model " + dir + " --input " + in + " --output " +
                     tmp.file("o.jsonl") + " --temperature 0 --max-new-tokens 4");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto d = json::parse(lines_of(tmp.file("o.jsonl")).at(0), "o");
  ASSERT_TRUE(d.HasMember("text"));
  EXPECT_FALSE(std::string(d["text"].GetString()).empty());
}

}  // namespace
}  // namespace ptk
