// Held-out evaluation (eval/eval.h) on the HF fixture model with make-data's byte tokenizer:
// the completions equal a plain uncached greedy loop, and the accuracy equals the one computed by
// hand from those completions.
#include <gtest/gtest.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include "core/model/qwen2.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "datasets/byte_tokenizer.h"
#include "reward/verifiers.h"
#include "eval/eval.h"
#include "tests/support/test_util.h"

namespace ptk::eval {
namespace {

std::string rl_line(const std::string& prompt, const std::string& answer) {
  rapidjson::StringBuffer b;
  rapidjson::Writer<rapidjson::StringBuffer> w(b);
  w.StartObject();
  w.Key("prompt");
  w.String(prompt.c_str());
  w.Key("answer");
  w.String(answer.c_str());
  w.EndObject();
  return std::string(b.GetString()) + "\n";
}

// Greedy decoding without a cache: full forward each step, argmax over the tokenizer's ids.
std::vector<int64_t> greedy(const model::Qwen2Model& m, std::vector<int64_t> ids, int64_t n, int64_t vocab,
                            const std::vector<int64_t>& stops) {
  torch::NoGradGuard ng;
  std::vector<int64_t> out;
  for (int64_t s = 0; s < n; ++s) {
    model::ForwardInput in;
    in.input_ids = torch::tensor(ids, torch::kInt64).unsqueeze(0);
    auto logits = m.forward(in).logits[0][-1].slice(0, 0, vocab);
    int64_t next = logits.argmax().item<int64_t>();
    out.push_back(next);
    ids.push_back(next);
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) break;
  }
  return out;
}

TEST(Eval, AccuracyEqualsHandComputedFromGenerations) {
  test::TempDir d;
  tasks::write_byte_tokenizer(d.file("tok"));
  auto tok = tokenizer::Tokenizer::load(d.file("tok"));
  auto model = model::Qwen2Model::from_pretrained(test::source_dir() + "/tests/fixtures/hf-qwen2/tiny-tied/checkpoint");
  std::vector<std::string> prompts = {"What is 1 + 2?", "What is 30 + 4?", "Hi", "abc", "12 * 12 =", "x"};
  std::string lines;
  for (auto& p : prompts) lines += rl_line(p, "unused");
  auto ps = read_eval_prompts(d.write("first.jsonl", lines), tok);
  ASSERT_EQ(ps.size(), prompts.size());
  EvalOptions o;
  o.verifier = "exact";
  o.max_new_tokens = 8;
  o.slots = 4;  // fewer slots than prompts: refills happen
  auto first = evaluate(model, tok, ps, o);
  ASSERT_EQ(first.samples, 6);
  // The engine's greedy completions equal a plain uncached loop.
  std::vector<int64_t> stops = {tok.eos_id()};
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto ids = greedy(model, ps[i].ids, o.max_new_tokens, tok.vocab_size(), stops);
    std::vector<tokenizer::TokenId> t(ids.begin(), ids.end());
    EXPECT_EQ(first.items[i].completion, tok.decode(t, true)) << "prompt " << i;
    EXPECT_EQ(first.items[i].length, static_cast<int64_t>(ids.size()));
  }
  // Answers equal to the completions for prompts 0, 2, 4 only: accuracy 3/6 by hand.
  std::string answered;
  for (size_t i = 0; i < prompts.size(); ++i)
    answered += rl_line(prompts[i], i % 2 == 0 ? first.items[i].completion : "definitely not this");
  auto second = evaluate(model, tok, read_eval_prompts(d.write("second.jsonl", answered), tok), o);
  double by_hand = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    double c = reward::verify_exact(second.items[i].completion, second.items[i].answer);
    EXPECT_EQ(second.items[i].correct, c);
    by_hand += c;
  }
  EXPECT_DOUBLE_EQ(second.accuracy, by_hand / 6);
  EXPECT_DOUBLE_EQ(second.accuracy, 0.5);
  EXPECT_GT(second.mean_length, 0);
  auto j = result_json(second, "m", "d", o);
  EXPECT_NE(j.find("\"accuracy\": 0.5"), std::string::npos) << j.substr(0, 300);
}

TEST(Eval, BadPromptLinesNameFileAndLine) {
  test::TempDir d;
  tasks::write_byte_tokenizer(d.file("tok"));
  auto tok = tokenizer::Tokenizer::load(d.file("tok"));
  std::string f = d.write("bad.jsonl", rl_line("ok", "1") + "{\"prompt\": \"no answer\"}\n");
  try {
    read_eval_prompts(f, tok);
    FAIL() << "expected an error";
  } catch (const ptk::Error& e) {
    EXPECT_NE(std::string(e.what()).find(f + ":2: "), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ptk::eval
