// The rollout engine against HF transformers' greedy generations and against full (uncached)
// forwards: greedy ids, per-token log-probs, seeds that do not depend on the batch, stop ids and
// strings, vocabulary limit, independent draws with the right distribution, cache freeing.
// Not the sampler chain in isolation (sampling_test) and not `ptk generate` (generate_cmd_test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <set>

#include "core/model/lora.h"
#include "core/model/packed_linear.h"
#include "core/model/qwen2.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "rollout/engine.h"
#include "rollout/token_bytes.h"
#include "tests/model/hf_fixture.h"
#include "tests/rollout/engine_test_support.h"
#include "tests/support/test_util.h"

namespace ptk::rollout {
namespace {

using model::Qwen2Model;

using test::ints;
using test_support::load;
using test_support::mixed_requests;

// log_softmax(logits / T) of a full forward over prompt + ids, at the positions that predicted
// each id: (n, V) float32.
at::Tensor full_logprobs(const Qwen2Model& m, const std::vector<int64_t>& prompt, const std::vector<int64_t>& ids,
                         double temperature) {
  std::vector<int64_t> all = prompt;
  all.insert(all.end(), ids.begin(), ids.end());
  model::ForwardInput in;
  in.input_ids = torch::tensor(all, torch::kLong).unsqueeze(0);
  auto logits = m.forward(in).logits[0].narrow(0, static_cast<int64_t>(prompt.size()) - 1,
                                                static_cast<int64_t>(ids.size()));  // (n, V)
  return torch::log_softmax(logits / (temperature > 0 ? temperature : 1.0), -1);
}

EngineOptions slots(int64_t s) {
  EngineOptions o;
  o.slots = s;
  return o;
}

class Fixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { at::set_num_threads(1); }
};

TEST_P(Fixture, GreedyIdsEqualTransformersAloneAndBatched) {
  auto m = load(GetParam());
  auto e = test::expected_json(GetParam());
  std::vector<Request> reqs;
  for (const auto& g : e["generation"].GetArray()) {
    Request r;
    r.prompt = ints(g["prompt_ids"]);
    r.sampling.temperature = 0;
    r.max_new_tokens = static_cast<int64_t>(g["new_ids"].Size());
    r.stop_ids = {2};  // the fixture's eos
    reqs.push_back(r);
  }
  // Unbatched: one slot, one request at a time.
  Engine alone(m, slots(1));
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto got = alone.generate({reqs[i]});
    EXPECT_EQ(got[0][0].ids, ints(e["generation"][static_cast<rapidjson::SizeType>(i)]["new_ids"])) << "prompt " << i;
    EXPECT_EQ(got[0][0].finish_reason, FinishReason::kLength);
  }
  // Batched (HF: left-padded batch; here: mixed lengths in three slots decoding together).
  Engine batched(m, slots(3));
  auto got = batched.generate(reqs);
  const auto& want = e["generation_batched_left_padded"]["new_ids"];
  for (size_t i = 0; i < reqs.size(); ++i)
    EXPECT_EQ(got[i][0].ids, ints(want[static_cast<rapidjson::SizeType>(i)])) << "batched prompt " << i;
  EXPECT_EQ(batched.last_stats().decode_steps, 12);
}

// Every sampled token's log-prob (and, for greedy, the id itself) equals what a full forward over
// the whole sequence gives: the cache, the prefix copies and the refills change nothing.
TEST_P(Fixture, CachedEqualsUncachedWithRefillsAndSharedPrompts) {
  auto m = load(GetParam());
  auto reqs = mixed_requests(GetParam());
  Engine eng(m, slots(4));  // 11 samples through 4 slots: refills and late prefix copies
  auto got = eng.generate(reqs);
  EXPECT_GT(eng.last_stats().prefix_copies, 0);
  double worst = 0;
  for (size_t r = 0; r < reqs.size(); ++r)
    for (const auto& s : got[r]) {
      ASSERT_EQ(static_cast<int64_t>(s.ids.size()), reqs[r].max_new_tokens);
      ASSERT_EQ(s.logprobs.size(), s.ids.size());
      auto lp = full_logprobs(m, reqs[r].prompt, s.ids, reqs[r].sampling.temperature);
      for (size_t t = 0; t < s.ids.size(); ++t) {
        double want = lp[static_cast<int64_t>(t)][s.ids[t]].item<double>();
        worst = std::max(worst, std::abs(want - s.logprobs[t]));
        EXPECT_NEAR(s.logprobs[t], want, 1e-4) << "request " << r << " token " << t;
        if (reqs[r].sampling.greedy()) {
          EXPECT_EQ(lp[static_cast<int64_t>(t)].argmax().item<int64_t>(), s.ids[t]);
        }
        if (reqs[r].sampling.top_k > 0) {  // the chosen id is among the k largest
          auto row = lp[static_cast<int64_t>(t)];
          EXPECT_LT((row > row[s.ids[t]]).sum().item<int64_t>(), reqs[r].sampling.top_k);
        }
      }
    }
  std::printf("  cached engine vs full forward: max |logprob diff| %.3g\n", worst);
}

INSTANTIATE_TEST_SUITE_P(HF, Fixture, ::testing::Values("tiny-tied", "tiny-untied"));

TEST(Engine, SameSeedSameSamplesAloneOrInAMixedBatch) {
  at::set_num_threads(1);
  auto m = load("tiny-untied");
  Request a;
  a.prompt = {266, 459, 57, 163, 31};
  a.samples = 4;
  a.seed = 1234;
  a.sampling.temperature = 1.0;
  a.max_new_tokens = 10;
  Engine alone(m, slots(4));
  auto ref = alone.generate({a})[0];

  Request b = a, c = a;
  b.prompt = {298, 257, 63, 86, 109, 298, 96, 402};
  b.seed = 1;
  b.max_new_tokens = 3;
  c.prompt = {459, 12};
  c.seed = 99;
  c.samples = 5;
  c.sampling.top_k = 7;
  Engine mixed(m, slots(3));  // other requests first, fewer slots: a's samples land in other slots and steps
  auto got = mixed.generate({b, c, a, b});
  for (int g = 0; g < 4; ++g) {
    EXPECT_EQ(got[2][g].ids, ref[g].ids) << "sample " << g;
    for (size_t t = 0; t < ref[g].ids.size(); ++t) EXPECT_NEAR(got[2][g].logprobs[t], ref[g].logprobs[t], 1e-5);
  }
  // And a different seed gives different samples.
  a.seed = 1235;
  auto other = alone.generate({a})[0];
  int same = 0;
  for (int g = 0; g < 4; ++g) same += other[g].ids == ref[g].ids;
  EXPECT_LT(same, 4);
}

TEST(Engine, SamplesOfASharedPromptAreIndependentDraws) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  Request r;
  r.prompt = {325, 356, 379, 329};
  r.samples = 8;
  r.seed = 5;
  r.max_new_tokens = 8;
  Engine eng(m, slots(8));
  auto got = eng.generate({r})[0];
  std::set<std::vector<int64_t>> distinct;
  for (const auto& s : got) distinct.insert(s.ids);
  EXPECT_EQ(distinct.size(), 8u) << "8 samples of one prompt should differ";
  EXPECT_EQ(eng.last_stats().prefills, 1);  // the prompt was prefilled once for its 8 samples
}

// One step from one prompt, many samples: empirical frequencies against the softmax of the full
// forward (temperature; then top-k; then top-p renormalised over the nucleus).
TEST(Engine, DrawsFollowTheFilteredSoftmax) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  const std::vector<int64_t> prompt = {476, 60, 63, 354};
  const int64_t N = 4000;
  struct Case {
    double t, p;
    int64_t k;
  };
  for (Case cs : {Case{0.5, 1.0, 0}, Case{1.0, 1.0, 8}, Case{0.8, 0.6, 0}}) {
    Request r;
    r.prompt = prompt;
    r.samples = N;
    r.seed = 42;
    r.max_new_tokens = 1;
    r.sampling = {cs.t, cs.p, cs.k};
    Engine eng(m, slots(64));
    auto got = eng.generate({r})[0];
    auto lp = full_logprobs(m, prompt, {0}, cs.t)[0];  // (V)
    auto p = lp.exp();
    // The expected filtered distribution, built independently of the sampler code.
    auto order = std::get<1>(p.sort(0, /*descending=*/true));
    std::vector<int64_t> keep;
    double mass = 0;
    for (int64_t j = 0; j < p.size(0); ++j) {
      int64_t id = order[j].item<int64_t>();
      if (cs.k > 0 && j >= cs.k) break;
      if (cs.p < 1.0 && mass >= cs.p) break;
      keep.push_back(id);
      mass += p[id].item<double>();
    }
    if (cs.k > 0) mass = 0;
    if (cs.k > 0)
      for (int64_t id : keep) mass += p[id].item<double>();
    std::map<int64_t, int64_t> count;
    for (const auto& s : got) {
      ASSERT_EQ(s.ids.size(), 1u);
      ++count[s.ids[0]];
      EXPECT_NEAR(s.logprobs[0], lp[s.ids[0]].item<double>(), 1e-4);  // not renormalised
    }
    double chi2 = 0, max_dev = 0;
    int64_t outside = 0;
    std::set<int64_t> kept(keep.begin(), keep.end());
    for (auto [id, c] : count)
      if (!kept.count(id)) outside += c;
    for (int64_t id : keep) {
      double q = p[id].item<double>() / mass, f = count.count(id) ? double(count[id]) / N : 0.0;
      max_dev = std::max(max_dev, std::abs(f - q));
      if (q * N >= 5) chi2 += (f - q) * (f - q) * N / q;
    }
    std::printf("  T %.1f top_p %.1f top_k %lld: %zu tokens kept, max |freq - p| %.4f, chi2 %.1f\n", cs.t, cs.p,
                static_cast<long long>(cs.k), keep.size(), max_dev, chi2);
    EXPECT_EQ(outside, 0) << "a filtered-out token was drawn";
    EXPECT_LT(max_dev, 0.03);
    // Cases keeping few tokens: a chi-square test (dof < 10: 1e-4 critical value below 35).
    if (keep.size() <= 10) {
      EXPECT_LT(chi2, 35.0);
    }
  }
}

TEST(Engine, VocabLimitIsNeverSampled) {
  at::set_num_threads(1);
  auto m = load("tiny-untied").clone();
  // Make the rows past the limit the most likely ones, so a leak would show.
  m.lm_head_.narrow(0, 100, 412).mul_(8.0);
  Request r;
  r.prompt = {266, 459, 57};
  r.samples = 40;
  r.max_new_tokens = 5;
  r.seed = 3;
  Engine unlimited(m, slots(8));
  int64_t above = 0;
  const auto free_run = unlimited.generate({r});
  for (const auto& s : free_run[0])
    for (auto id : s.ids) above += id >= 100;
  EXPECT_GT(above, 0) << "the test needs the rows past the limit to be likely";

  EngineOptions o;
  o.slots = 8;
  o.vocab_limit = 100;
  Engine limited(m, o);
  Request g = r;
  g.samples = 1;
  g.sampling.temperature = 0;
  auto got = limited.generate({r, g});
  for (const auto& s : got[0])
    for (size_t t = 0; t < s.ids.size(); ++t) EXPECT_LT(s.ids[t], 100);
  const auto& greedy = got[1][0];
  auto lp = full_logprobs(m, g.prompt, greedy.ids, 1.0);
  for (size_t t = 0; t < greedy.ids.size(); ++t) {
    EXPECT_EQ(lp[static_cast<int64_t>(t)].narrow(0, 0, 100).argmax().item<int64_t>(), greedy.ids[t]);
    EXPECT_NEAR(greedy.logprobs[t], lp[static_cast<int64_t>(t)][greedy.ids[t]].item<double>(), 1e-4);  // full softmax
  }
}

TEST(Engine, StopIdsAndStopStringsCutAfterTheCompletingToken) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  Request r;
  r.prompt = {469, 148, 85, 228, 488, 493};
  r.sampling.temperature = 0;
  r.max_new_tokens = 12;
  Engine plain(m, slots(2));
  const auto full = plain.generate({r})[0][0].ids;  // 232 337 337 401 67 411 214 82 ...
  ASSERT_EQ(full.size(), 12u);

  // Stop id: the 4th greedy token (its first occurrence) ends the sample, and is kept.
  Request s = r;
  s.stop_ids = {full[3]};
  auto a = plain.generate({s})[0][0];
  std::vector<int64_t> upto(full.begin(), full.begin() + 4);
  EXPECT_EQ(a.ids, upto);
  EXPECT_EQ(a.finish_reason, FinishReason::kStop);
  EXPECT_EQ(a.stop_id, full[3]);

  // Stop string spanning tokens 5 and 6: "<67><41" with bytes "<id>" per token.
  auto table = std::make_shared<std::vector<std::string>>();
  for (int i = 0; i < 512; ++i) table->push_back("<" + std::to_string(i) + ">");
  const std::string stop = std::to_string(full[4]) + "><" + std::to_string(full[5]).substr(0, 1);
  // Expected cut: the first token whose bytes complete the first occurrence.
  size_t want = 0;
  for (std::string text; want < full.size(); ++want) {
    text += (*table)[full[want]];
    if (text.find(stop) != std::string::npos) break;
  }
  ASSERT_LT(want, full.size());
  EngineOptions o;
  o.slots = 2;
  o.token_bytes = table;
  Engine eng(m, o);
  Request t = r;
  t.stop_strings = {"never-there", stop};
  auto b = eng.generate({t, r});
  EXPECT_EQ(b[0][0].ids, std::vector<int64_t>(full.begin(), full.begin() + static_cast<int64_t>(want) + 1));
  EXPECT_EQ(b[0][0].finish_reason, FinishReason::kStop);
  EXPECT_EQ(b[0][0].stop_string, stop);
  EXPECT_EQ(b[1][0].ids, full);  // the other request runs to its length
  EXPECT_EQ(b[1][0].finish_reason, FinishReason::kLength);
  // A stop string inside one token's bytes stops on that token.
  t.stop_strings = {std::to_string(full[2]).substr(1)};
  auto c = eng.generate({t})[0][0];
  size_t first = 0;
  while (first < full.size() && (*table)[full[first]].find(t.stop_strings[0]) == std::string::npos) ++first;
  EXPECT_EQ(c.ids.size(), first + 1);

  // Without a table the request is refused, with a hint.
  try {
    plain.generate({t});
    FAIL() << "stop strings without token_bytes must throw";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("token_bytes"), std::string::npos) << err.what();
  }
}

TEST(Engine, TokenBytesTableConcatenatesToTheDecodedText) {
  std::string path = test::qwen_tokenizer_json();
  if (path.empty()) PTK_SKIP_WITHOUT("qwen-tokenizer") << "no Qwen tokenizer.json (assets/tokenizers/qwen or ../shared/tokenizers/qwen)";
  auto tok = tokenizer::Tokenizer::load(path);
  auto table = token_bytes_table(tok);
  ASSERT_EQ(table->size(), tok.vocab_size());
  const std::string text = "Natalia sold 48/2 = <<48/2=24>>24 clips — ünïcödé 日本語 🙂\n#### 72<|im_end|>";
  std::string joined;
  std::vector<tokenizer::TokenId> ids = tok.encode(text);
  for (auto id : ids) joined += (*table)[static_cast<size_t>(id)];
  EXPECT_EQ(joined, text);
  EXPECT_EQ((*table)[static_cast<size_t>(tok.im_end_id())], "<|im_end|>");
}

TEST(Engine, CacheIsFreedAndReallocated) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  Engine eng(m, slots(4));
  Request r;
  r.prompt = {3, 4, 5};
  r.sampling.temperature = 0;
  r.max_new_tokens = 4;
  auto first = eng.generate({r});
  EXPECT_GT(eng.cache_bytes(), 0u);
  eng.free_cache();
  EXPECT_EQ(eng.cache_bytes(), 0u);
  EXPECT_EQ(eng.generate({r})[0][0].ids, first[0][0].ids);
}

// The packed LM head and layers (EngineOptions::pack_lm_head / pack_trunk, on by default where the
// CPU has AVX-512) give the same samples and log-probs as at::mm's, and the stats say which ran.
TEST(Engine, PackedWeightsSampleLikeTheUnpackedOnes) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  std::vector<Request> reqs(2);
  reqs[0].prompt = {3, 4, 5};
  reqs[0].samples = 3;
  reqs[0].seed = 7;
  reqs[0].max_new_tokens = 12;
  reqs[1].prompt = {9, 8};
  reqs[1].sampling.temperature = 0;
  reqs[1].max_new_tokens = 12;
  auto off_opts = slots(3);
  off_opts.pack_lm_head = false;
  off_opts.pack_trunk = false;
  Engine on(m, slots(3)), off(m, off_opts);
  auto a = on.generate(reqs), b = off.generate(reqs);
  EXPECT_FALSE(off.last_stats().packed_lm_head);
  EXPECT_FALSE(off.last_stats().packed_trunk);
  EXPECT_EQ(on.last_stats().packed_lm_head, model::PackedLinear::supported(m.lm_head_weight()));
  EXPECT_EQ(on.last_stats().packed_trunk, model::PackedLinear::supported(m.lm_head_weight()));
  // Over the byte budget the trunk stays unpacked.
  auto tight = slots(3);
  tight.pack_max_bytes = 16;
  Engine small(m, tight);
  auto c = small.generate(reqs);
  EXPECT_FALSE(small.last_stats().packed_trunk);
  EXPECT_EQ(c[1][0].ids, b[1][0].ids);
  if (!on.last_stats().packed_lm_head) std::printf("  no AVX-512F here: both engines used at::mm\n");
  for (size_t i = 0; i < reqs.size(); ++i)
    for (size_t g = 0; g < a[i].size(); ++g) {
      EXPECT_EQ(a[i][g].ids, b[i][g].ids) << "request " << i << " sample " << g;
      ASSERT_EQ(a[i][g].logprobs.size(), b[i][g].logprobs.size());
      for (size_t t = 0; t < a[i][g].logprobs.size(); ++t) EXPECT_NEAR(a[i][g].logprobs[t], b[i][g].logprobs[t], 1e-5);
    }
}

// EngineOptions::keep_packed (GRPO with LoRA): the base's packed copies made by the first call serve
// the later ones, while LoRA adapters updated in place between calls (as the optimizer does) apply
// live: a later call samples like a fresh engine on the updated model. drop_packed() repacks.
TEST(Engine, KeptPackedWeightsServeLaterCallsWithLiveAdapters) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  torch::NoGradGuard ng;
  model::LoraOptions lo;
  lo.rank = 4;
  auto lora = model::Lora::attach(m, lo, 5);
  std::vector<Request> reqs(1);
  reqs[0].prompt = {3, 4, 5};
  reqs[0].samples = 3;
  reqs[0].seed = 7;
  reqs[0].max_new_tokens = 12;
  auto keep_opts = slots(3);
  keep_opts.keep_packed = true;
  Engine keep(m, keep_opts);
  keep.generate(reqs);
  EXPECT_FALSE(keep.last_stats().packed_reused);
  torch::manual_seed(1);
  for (auto& [name, t] : lora.named_parameters())
    if (name.find("lora_B") != std::string::npos) t.add_(torch::randn_like(t) * 0.5);  // an update, in place
  auto a = keep.generate(reqs);
  EXPECT_TRUE(keep.last_stats().packed_reused);
  Engine fresh(m, slots(3));
  auto b = fresh.generate(reqs);
  EXPECT_FALSE(fresh.last_stats().packed_reused);
  const auto merged = lora.merged(m);
  for (size_t g = 0; g < a[0].size(); ++g) {
    EXPECT_EQ(a[0][g].ids, b[0][g].ids) << "sample " << g;
    ASSERT_EQ(a[0][g].logprobs.size(), b[0][g].logprobs.size());
    auto full = full_logprobs(merged, reqs[0].prompt, a[0][g].ids, 1.0);
    for (size_t t = 0; t < a[0][g].logprobs.size(); ++t) {
      EXPECT_NEAR(a[0][g].logprobs[t], b[0][g].logprobs[t], 1e-5);
      // The merged weights round differently from base + separate adapter products (up to 1.2e-4 on
      // AVX-512's packed path); stale adapters would be off by the update's effect, ~0.1 and more.
      EXPECT_NEAR(a[0][g].logprobs[t], full[static_cast<int64_t>(t)][a[0][g].ids[t]].item<float>(), 1e-3)
          << "the kept engine did not see the updated adapters";
    }
  }
  keep.drop_packed();
  keep.generate(reqs);
  EXPECT_FALSE(keep.last_stats().packed_reused);
}

TEST(Engine, BadRequestsSayWhichAndWhy) {
  auto m = load("tiny-tied");
  EngineOptions o;
  o.max_len = 8;
  Engine eng(m, o);
  auto expect_error = [&](Request r, const std::string& needle) {
    try {
      Request fine;
      fine.prompt = {3};
      fine.max_new_tokens = 2;
      eng.generate({fine, r});
      ADD_FAILURE() << "expected an error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("request 1"), std::string::npos) << e.what();
    }
  };
  Request ok;
  ok.prompt = {3, 4};
  ok.max_new_tokens = 4;
  Request r = ok;
  r.prompt = {3, 512};
  expect_error(r, "outside the model's vocabulary");
  r = ok;
  r.prompt.clear();
  expect_error(r, "empty prompt");
  r = ok;
  r.sampling.top_p = 0;
  expect_error(r, "top_p");
  r = ok;
  r.max_new_tokens = 100;
  expect_error(r, "max_len 8");
  EngineOptions bad;
  bad.vocab_limit = 513;
  EXPECT_THROW(Engine(m, bad), Error);  // vocab_limit past the model's rows
}

}  // namespace
}  // namespace ptk::rollout
