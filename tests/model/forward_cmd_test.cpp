// `ptk forward` end to end: the fixture batches through the binary, outputs compared with the
// transformers reference. Not the model numerics themselves (qwen2_test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/checkpoint/checkpoint.h"
#include "tests/model/hf_fixture.h"

namespace ptk {
namespace {

using test::fixture_dir;

std::string inputs_json(const std::string& cfg, const std::string& which, bool with_positions) {
  auto doc = json::parse_file(fixture_dir(cfg) + "/inputs.json");
  const auto& b = doc[which.c_str()];
  std::string s = "{\"input_ids\": " + json::to_string(b["input_ids"]) +
                  ", \"attention_mask\": " + json::to_string(b["attention_mask"]);
  if (with_positions) s += ", \"position_ids\": " + json::to_string(b["position_ids"]);
  return s + "}";
}

TEST(ForwardCommand, LogitsMatchTransformers) {
  test::TempDir tmp;
  for (std::string side : {"right", "left"}) {
    auto in = tmp.write(side + ".json", inputs_json("tiny-untied", side + "_padded", side == "left"));
    auto out = tmp.file(side + ".safetensors");
    auto r = test::run(test::ptk_binary() + " forward --threads 1 --model " + fixture_dir("tiny-untied") +
                       "/checkpoint-sharded --input " + in + " --output " + out);
    ASSERT_EQ(r.exit_code, 0) << r.out;
    auto got = checkpoint::read_safetensors(out);
    ASSERT_TRUE(got.count("logits"));
    EXPECT_EQ(got.count("scores"), 0u);
    auto b = test::load_batch("tiny-untied", side + "_padded");
    PTK_EXPECT_CLOSE("ptk forward " + side + " logits",
                     test::compare(got.at("logits"), test::expected_tensors("tiny-untied").at(side + ".logits"), b.mask,
                                   1e-4, 1e-4));
  }
}

TEST(ForwardCommand, ScoreHeadFolderWritesScores) {
  test::TempDir tmp;
  auto in = tmp.write("left.json", inputs_json("tiny-tied", "left_padded", false));
  auto r = test::run(test::ptk_binary() + " forward --threads 1 --model " + fixture_dir("tiny-tied") +
                     "/seqcls-checkpoint --input " + in + " --output " + tmp.file("o.safetensors"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto got = checkpoint::read_safetensors(tmp.file("o.safetensors"));
  PTK_EXPECT_CLOSE("ptk forward scores", test::compare(got.at("scores"),
                                                       test::expected_tensors("tiny-tied").at("seqcls.left.scores").squeeze(-1),
                                                       {}, 1e-4, 1e-4));
  EXPECT_EQ(got.at("logits").sizes(), (std::vector<int64_t>{3, 16, 512}));  // tied: the LM head exists
}

TEST(ForwardCommand, BadInputSaysWhatAndWhere) {
  test::TempDir tmp;
  auto in = tmp.write("bad.json", R"({"input_ids": [[1, 2, 3], [4, 5]]})");
  auto r = test::run(test::ptk_binary() + " forward --model " + fixture_dir("tiny-tied") + "/checkpoint --input " + in +
                     " --output " + tmp.file("o.safetensors"));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("input_ids[1] has 2 entries"), std::string::npos) << r.out;
  auto missing = test::run(test::ptk_binary() + " forward --model " + tmp.file("nope") + " --input " + in +
                           " --output " + tmp.file("o.safetensors"));
  EXPECT_NE(missing.exit_code, 0);
  auto usage = test::run(test::ptk_binary() + " forward --input " + in);
  EXPECT_EQ(usage.exit_code, 2) << usage.out;
}

}  // namespace
}  // namespace ptk
