// The RM stage (reward/rm_stage.h) on a tiny random model: its step-1 loss and metrics equal
// rm_loss() on scores computed here independently (one row at a time, no padding), margin and
// centering included; final/ has the Qwen2ForSequenceClassification layout and reproduces the
// final eval; `ptk forward` on it writes `scores`. Not the loss formulas (tests/rm_loss).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <sstream>

#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/hf_config.h"
#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "reward/rm_loss.h"
#include "reward/rm_stage.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

struct Pair {
  std::string prompt, chosen, rejected;
  double margin;
};

const std::vector<Pair> kPairs = {
    {"What is 2 + 3?", " The answer is 5.", " The answer is 6.", 0.5},
    {"What is 10 + 7?", " The answer is 17.", " It is 71, I think.", 0.0},
    {"Add 4 and 4.", " 8", " The answer is 44.", 1.0},
    {"What is 1 + 1?", " The answer is 2.", " 11", 0.25},
    {"Sum 30 and 12?", " 42, since 30 + 12 = 42.", " 43", 0.0},
    {"What is 9 + 0?", " The answer is 9.", " The answer is 0.", 2.0},
};

const char* kConfig = R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259,
  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "hidden_act": "silu", "initializer_range": 0.1, "tie_word_embeddings": true, "eos_token_id": 258,
  "pad_token_id": 256, "torch_dtype": "float32"})";

std::string pairs_jsonl() {
  std::string s;
  for (const auto& p : kPairs)
    s += "{\"prompt\": \"" + p.prompt + "\", \"chosen\": \"" + p.chosen + "\", \"rejected\": \"" + p.rejected +
         "\", \"margin\": " + std::to_string(p.margin) + "}\n";
  return s;
}

// Each row alone: TRL's non-conversational encoding (prompt, reply + EOS), score at the last token.
std::pair<at::Tensor, at::Tensor> scores_one_by_one(const model::Qwen2Model& m, const tokenizer::Tokenizer& tok) {
  std::vector<double> c, r;
  for (const auto& p : kPairs) {
    for (int k = 0; k < 2; ++k) {
      auto ids = tok.encode(p.prompt);
      auto reply = tok.encode(k == 0 ? p.chosen : p.rejected);
      ids.insert(ids.end(), reply.begin(), reply.end());
      ids.push_back(tok.eos_id());
      std::vector<int64_t> v(ids.begin(), ids.end());
      auto t = torch::tensor(v, torch::kInt64).unsqueeze(0);
      model::ForwardOptions fo;
      fo.logits = false;
      auto h = m.forward({t, {}, {}, {}}, fo).hidden;
      double s = m.score(h, torch::tensor({static_cast<int64_t>(v.size()) - 1}, torch::kInt64)).item<double>();
      (k == 0 ? c : r).push_back(s);
    }
  }
  return {torch::tensor(c, torch::kDouble), torch::tensor(r, torch::kDouble)};
}

std::vector<rapidjson::Document> read_metrics(const std::string& path) {
  std::ifstream f(path);
  std::vector<rapidjson::Document> out;
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(json::parse(line, path));
  return out;
}

// issue 24: a micro-batch no machine holds is refused before the model or data are loaded, naming
// the key (chosen + rejected: twice the rows).
TEST(RmStage, HugeMicroBatchIsRefusedBeforeLoading) {
  test::TempDir tmp;
  tasks::write_byte_tokenizer(tmp.file("tok"));
  tmp.write("config.json", kConfig);
  std::string data = tmp.write("pairs.jsonl", pairs_jsonl());
  reward::RmRecipe recipe;
  config::bind_recipe(config::load_recipe("", {"run.dir=" + tmp.file("run"), "model.config=" + tmp.file("config.json"),
                                               "tokenizer.path=" + tmp.file("tok"), "data.train=[\"" + data + "\"]",
                                               "data.max_seq_len=64", "train.micro_batch_size=1000000000"}),
                      recipe.all_sections());
  try {
    reward::run_rm(recipe, "rm.json", config::resolved_json(recipe.all_sections()));
    ADD_FAILURE() << "not refused";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("rm: train.micro_batch_size=1000000000 pairs (2000000000 rows) x data.max_seq_len=64 needs ~"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("lower train.micro_batch_size to "), std::string::npos) << msg;
  }
  EXPECT_FALSE(path_exists(tmp.file("run/data"))) << "data was prepared before the refusal";
}

TEST(RmStage, LossEqualsRmLossAndFinalFolderIsASequenceClassifier) {
  at::set_num_threads(1);
  test::TempDir tmp;
  tasks::write_byte_tokenizer(tmp.file("tok"));
  tmp.write("config.json", kConfig);
  std::string data = tmp.write("pairs.jsonl", pairs_jsonl());
  const double c = 0.01;
  reward::RmRecipe recipe;
  auto json = config::load_recipe(
      "", {"run.dir=" + tmp.file("run"), "run.seed=5", "model.config=" + tmp.file("config.json"),
           "tokenizer.path=" + tmp.file("tok"), "data.train=[\"" + data + "\"]", "data.eval=[\"" + data + "\"]",
           "data.max_seq_len=64", "train.max_steps=3", "train.micro_batch_size=6", "train.eval_every=0",
           "optim.lr=1e-2", "optim.warmup_steps=0", "checkpoint.every=0",
           "rm.center_rewards_coefficient=" + std::to_string(c)});
  config::bind_recipe(json, recipe.all_sections());
  std::string run_dir = reward::run_rm(recipe, "rm.json", config::resolved_json(recipe.all_sections()));

  // The starting model, rebuilt as the stage builds it: from_config(seed) + a score head (seed + 1).
  auto tok = tokenizer::Tokenizer::load(tmp.file("tok"));
  auto init = model::Qwen2Model::from_config(checkpoint::read_config(tmp.file("config.json")), 5);
  init.add_score_head(6, tok.pad_id());
  auto [c0, r0] = scores_one_by_one(init, tok);
  std::vector<double> margins;
  for (const auto& p : kPairs) margins.push_back(p.margin);
  at::Tensor m = torch::tensor(margins, torch::kDouble);
  reward::RmLossOptions lo;
  lo.center_rewards_coefficient = c;
  double want = reward::rm_loss(c0, r0, m, lo).loss.item<double>();
  auto metrics = read_metrics(run_dir + "/metrics.jsonl");
  ASSERT_GE(metrics.size(), 3u);
  double got = metrics[0]["loss"].GetDouble();
  std::printf("  step-1 loss: stage %.9f, rm_loss on one-by-one scores %.9f\n", got, want);
  EXPECT_NEAR(got, want, 1e-5);
  auto expect_metrics = reward::rm_metrics(reward::rm_metric_sums(c0, r0));
  for (const auto& [k, v] : expect_metrics) {
    ASSERT_TRUE(metrics[0].HasMember(k.c_str())) << k;
    EXPECT_NEAR(metrics[0][k.c_str()].GetDouble(), v, 1e-5) << k;
  }

  // final/: HF sequence-classification layout, loads back, and reproduces the final eval.
  std::string fin = run_dir + "/final";
  auto cfg = json::parse_file(fin + "/config.json");
  EXPECT_STREQ(cfg["architectures"][0].GetString(), "Qwen2ForSequenceClassification");
  // transformers writes num_labels as id2label (one label): what its PretrainedConfig reads back.
  ASSERT_TRUE(cfg.HasMember("id2label"));
  EXPECT_EQ(cfg["id2label"].MemberCount(), 1u);
  EXPECT_EQ(cfg["pad_token_id"].GetInt(), 256);
  auto names = checkpoint::read_checkpoint_tensors(fin);
  EXPECT_TRUE(names.count("score.weight"));
  EXPECT_FALSE(names.count("lm_head.weight"));
  EXPECT_TRUE(path_exists(fin + "/tokenizer.json"));
  auto trained = model::Qwen2Model::from_pretrained(fin);
  ASSERT_TRUE(trained.has_score_head());
  auto [c1, r1] = scores_one_by_one(trained, tok);
  const auto& last = metrics.back();
  ASSERT_TRUE(last.HasMember("eval/loss"));
  double want_eval = reward::rm_loss(c1, r1, m, lo).loss.item<double>();
  std::printf("  final eval loss: stage %.9f, from final/ %.9f (step-1 %.6f)\n", last["eval/loss"].GetDouble(),
              want_eval, got);
  EXPECT_NEAR(last["eval/loss"].GetDouble(), want_eval, 1e-5);
  for (const auto& [k, v] : reward::rm_metrics(reward::rm_metric_sums(c1, r1)))
    EXPECT_NEAR(last[("eval/" + k).c_str()].GetDouble(), v, 1e-5) << k;
  EXPECT_LT(want_eval, want) << "three steps at lr 1e-2 should lower the loss";

  // Batched scoring (right padding, pooling at the last non-pad token) equals one-by-one.
  std::vector<std::vector<int64_t>> rows;
  for (const auto& p : kPairs) {
    auto ids = tok.encode(p.prompt + p.chosen);
    rows.emplace_back(ids.begin(), ids.end());
    rows.back().push_back(tok.eos_id());
  }
  auto [ids, lens] = reward::pad_rows(rows, 256);
  auto batched = reward::score_rows(trained, ids, lens, 256).to(torch::kDouble);
  EXPECT_TRUE(torch::allclose(batched, c1, 1e-5, 1e-5)) << batched << c1;

  // `ptk forward` on final/ writes `scores` equal to ours.
  std::string in = tmp.write("fwd.json", "{\"input_ids\": [[" + [&] {
    std::string s;
    for (size_t i = 0; i < rows[0].size(); ++i) s += (i ? "," : "") + std::to_string(rows[0][i]);
    return s;
  }() + "]], \"attention_mask\": [[" + [&] {
    std::string s;
    for (size_t i = 0; i < rows[0].size(); ++i) s += i ? ",1" : "1";
    return s;
  }() + "]]}");
  auto res = test::run(test::ptk_binary() + " forward --model " + fin + " --input " + in + " --output " +
                       tmp.file("out.safetensors"));
  ASSERT_EQ(res.exit_code, 0) << res.out;
  auto out = checkpoint::read_safetensors(tmp.file("out.safetensors"));
  ASSERT_TRUE(out.count("scores")) << "ptk forward wrote no scores";
  EXPECT_NEAR(out.at("scores").item<double>(), c1[0].item<double>(), 1e-5);
}

}  // namespace
}  // namespace ptk
