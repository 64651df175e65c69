// `ptk sft` on real chat data (../shared/data: LIMA, Alpaca, OASST, ShareGPT ... mapped to docs/DESIGN.md's
// messages format) with the real Qwen tokenizer, for a few steps on a tiny random model with the
// full 151,936-row vocabulary. Skips with a message when ../shared or the tokenizer is absent.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/datasets/shared_data.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

TEST(SftRealData, FewStepsOnSharedChatData) {
  std::string shared = test::shared_dir();
  if (shared.empty()) PTK_SKIP_WITHOUT("shared") << "../shared is absent: real-data SFT test skipped";
  std::string tok = test::source_dir() + "/assets/tokenizers/qwen";
  if (!path_exists(tok + "/tokenizer.json")) PTK_SKIP_WITHOUT("qwen-tokenizer") << "no Qwen tokenizer (run scripts/setup.sh)";
  auto convs = test::shared_chat_conversations(shared + "/data");
  ASSERT_GT(convs.size(), 100u);
  test::TempDir d;
  {
    std::ofstream out(d.file("chat.jsonl"));
    // Every 50th conversation: a few hundred real chats in several languages.
    for (size_t i = 0; i < convs.size(); i += 50) out << "{\"messages\": " << convs[i] << "}\n";
  }
  d.write("model.json", R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 1024, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": true, "use_sliding_window": false})");
  d.write("sft.json", "{\"model\": {\"config\": \"" + d.file("model.json") + "\"}, \"tokenizer\": {\"path\": \"" + tok +
                          "\", \"chat_template\": \"qwen2.5\"},\n \"data\": {\"train\": [\"" + d.file("chat.jsonl") +
                          "\"], \"max_seq_len\": 512},\n \"train\": {\"max_steps\": 3, \"micro_batch_size\": 2},"
                          " \"optim\": {\"lr\": 1e-3}}");
  auto r = test::run(test::ptk_binary() + " sft --recipe " + d.file("sft.json") + " run.dir=" + d.file("run"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  std::istringstream in(read_file(d.file("run/metrics.jsonl")));
  int steps = 0;
  for (std::string line; std::getline(in, line); ++steps) {
    auto m = json::parse(line, "metrics");
    EXPECT_GT(m["loss"].GetDouble(), 5.0);  // a random model over 151,936 ids: loss near ln(151936) = 11.9
    EXPECT_GT(m["num_tokens"].GetDouble(), 0);
  }
  EXPECT_EQ(steps, 3);
  EXPECT_TRUE(path_exists(d.file("run/final/tokenizer.json")));
}

}  // namespace
}  // namespace ptk
