// The device-resident decode loop (rollout/device_loop.h) on the CPU, against the host loop and HF
// transformers: greedy ids on the fixtures, sampled ids and log-probs for the same seeds with
// refills, shared prompts, stop ids / strings, vocabulary limit, top-k / top-p and LoRA adapters;
// the tensor uniform equals sample_uniform bit for bit; the tensor sampler equals sample_rows;
// one device->host copy per step; the memory sizing of the KV cache.
// Not CUDA graphs (they need a GPU: tests/cuda/) and not the host loop alone (engine_test).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <limits>

#include "core/model/lora.h"
#include "core/model/qwen2.h"
#include "core/util/error.h"
#include "rollout/device_loop.h"
#include "rollout/engine.h"
#include "tests/model/hf_fixture.h"
#include "tests/rollout/engine_test_support.h"
#include "tests/support/test_util.h"

namespace ptk::rollout {
namespace {

using model::Qwen2Model;
using Mode = EngineOptions::DeviceLoopMode;

using test::ints;
using test_support::load;
using test_support::mixed_requests;

EngineOptions opts(int64_t slots, Mode mode) {
  EngineOptions o;
  o.slots = slots;
  o.device_loop = mode;
  return o;
}

// Every sample of `a` and `b`: same ids, log-probs within tol; returns the largest difference.
double expect_same_samples(const std::vector<std::vector<Sample>>& a, const std::vector<std::vector<Sample>>& b,
                           double tol) {
  double worst = 0;
  EXPECT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    EXPECT_EQ(a[i].size(), b[i].size());
    for (size_t g = 0; g < a[i].size() && g < b[i].size(); ++g) {
      EXPECT_EQ(a[i][g].ids, b[i][g].ids) << "request " << i << " sample " << g;
      EXPECT_EQ(a[i][g].finish_reason, b[i][g].finish_reason) << "request " << i << " sample " << g;
      EXPECT_EQ(a[i][g].stop_id, b[i][g].stop_id);
      EXPECT_EQ(a[i][g].stop_string, b[i][g].stop_string);
      if (a[i][g].logprobs.size() != b[i][g].logprobs.size()) continue;
      for (size_t t = 0; t < a[i][g].logprobs.size(); ++t)
        worst = std::max(worst, std::abs(double(a[i][g].logprobs[t]) - double(b[i][g].logprobs[t])));
    }
  }
  EXPECT_LE(worst, tol);
  return worst;
}

TEST(DeviceLoop, UniformTensorEqualsSampleUniformBitForBit) {
  std::vector<uint64_t> seeds = {0, 1, 5, 1234, 0x7FFFFFFFFFFFFFFFull, 0x8000000000000000ull, 0xFFFFFFFFFFFFFFFFull,
                                 0xDEADBEEFCAFEBABEull};
  std::vector<int64_t> sd, sm, st;
  std::vector<double> want;
  for (uint64_t s : seeds)
    for (int64_t g : {0, 1, 7, 63, 1000000})
      for (int64_t t : {0, 1, 2, 255, 4096, 123456789}) {
        sd.push_back(static_cast<int64_t>(s));
        sm.push_back(g);
        st.push_back(t);
        want.push_back(sample_uniform(s, g, t));
      }
  auto got = sample_uniform_tensor(torch::tensor(sd, torch::kLong), torch::tensor(sm, torch::kLong),
                                   torch::tensor(st, torch::kLong));
  ASSERT_EQ(got.scalar_type(), torch::kDouble);
  const double* p = got.data_ptr<double>();
  int mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (std::memcmp(&p[i], &want[i], sizeof(double)) != 0) ++mismatches;
  EXPECT_EQ(mismatches, 0) << "of " << want.size();
}

// The tensor chain against the host chain on random rows: same ids, log-probs within float32 rounding.
TEST(DeviceLoop, TensorSamplerEqualsSampleRows) {
  at::set_num_threads(1);
  torch::manual_seed(3);
  const int64_t R = 48, V = 700, lim = 650;
  auto logits = torch::randn({R, V}) * 3;
  std::vector<SamplingParams> params;
  std::vector<double> uniforms;
  std::vector<float> inv;
  std::vector<uint8_t> greedy;
  std::vector<int64_t> tk;
  std::vector<double> tp;
  for (int64_t r = 0; r < R; ++r) {
    SamplingParams p;
    p.temperature = r % 6 == 0 ? 0.0 : 0.5 + 0.1 * double(r % 7);
    p.top_k = r % 3 == 1 ? 1 + r % 40 : (r % 11 == 2 ? 900 : 0);
    p.top_p = r % 4 == 2 ? 0.3 + 0.1 * double(r % 6) : 1.0;
    params.push_back(p);
    uniforms.push_back(sample_uniform(9, r, r * 3));
    inv.push_back(p.greedy() ? 1.0f : static_cast<float>(1.0 / p.temperature));
    greedy.push_back(p.greedy());
    tk.push_back(p.greedy() ? 0 : p.top_k);
    tp.push_back(p.greedy() ? 1.0 : p.top_p);
  }
  Drawn want = sample_rows(logits, params, uniforms, lim);
  RowSampling rs;
  rs.inv_temperature = torch::tensor(inv, torch::kFloat);
  rs.greedy = torch::tensor(std::vector<int64_t>(greedy.begin(), greedy.end()), torch::kLong).ne(0);
  rs.top_k = torch::tensor(tk, torch::kLong);
  rs.top_p = torch::tensor(tp, torch::kDouble);
  rs.uniform = torch::tensor(uniforms, torch::kDouble);
  Drawn got = sample_rows_tensor(logits, rs, lim, /*filters=*/true);
  EXPECT_TRUE(torch::equal(got.ids, want.ids)) << got.ids << want.ids;
  EXPECT_LT((got.logprobs - want.logprobs).abs().max().item<double>(), 1e-5);
  EXPECT_LT(got.ids.max().item<int64_t>(), lim);
  // Without filters (no row may use them): the same as the host chain on plain rows.
  for (auto& p : params) p.top_k = 0, p.top_p = 1.0;
  rs.top_k.zero_();
  rs.top_p.fill_(1.0);
  Drawn want_plain = sample_rows(logits, params, uniforms, lim);
  Drawn got_plain = sample_rows_tensor(logits, rs, lim, /*filters=*/false);
  EXPECT_TRUE(torch::equal(got_plain.ids, want_plain.ids));
  EXPECT_LT((got_plain.logprobs - want_plain.logprobs).abs().max().item<double>(), 1e-5);
}

// At Qwen2.5's vocabulary a row keeps up to ~150k columns after top-k / top-p, each ~1e-5 of the
// mass: both samplers sum the inverse CDF in float64 (CUDA's float32 cumsum accumulates in float32
// and drifts by more than a column's width; the CPU's accumulates in double either way). Each row's
// uniform aims at the middle of one late column: both samplers must draw exactly that column.
TEST(DeviceLoop, TensorSamplerEqualsSampleRowsAtTheFullVocabulary) {
  at::set_num_threads(1);
  torch::manual_seed(5);
  const int64_t R = 8, V = 151936, lim = 151665, k = lim - 1;  // top-k: every column but the smallest
  auto logits = torch::randn({R, V}) * 0.5;
  std::vector<SamplingParams> params(R);
  std::vector<double> uniforms;
  std::vector<int64_t> aimed;
  for (int64_t r = 0; r < R; ++r) {
    params[r].temperature = 1.0;
    params[r].top_k = k;
    auto x = logits[r].narrow(0, 0, lim).clone();
    const float thr = std::get<0>(x.sort(0, /*descending=*/true))[k - 1].item<float>();
    x.masked_fill_(x < thr, -std::numeric_limits<float>::infinity());
    auto cdf = (x - x.max()).exp().to(torch::kDouble).cumsum(0);
    const int64_t j = lim - 1000 - 3000 * r;  // a late column, kept (the smallest is the only one cut)
    const double lo = cdf[j - 1].item<double>(), hi = cdf[j].item<double>(), total = cdf[lim - 1].item<double>();
    ASSERT_GT(hi, lo);
    uniforms.push_back((lo + 0.5 * (hi - lo)) / total);
    aimed.push_back(j);
  }
  Drawn want = sample_rows(logits, params, uniforms, lim);
  RowSampling rs;
  rs.inv_temperature = torch::ones({R}, torch::kFloat);
  rs.greedy = torch::zeros({R}, torch::kBool);
  rs.top_k = torch::full({R}, k, torch::kLong);
  rs.top_p = torch::ones({R}, torch::kDouble);
  rs.uniform = torch::tensor(uniforms, torch::kDouble);
  Drawn got = sample_rows_tensor(logits, rs, lim, /*filters=*/true);
  EXPECT_TRUE(torch::equal(want.ids, torch::tensor(aimed))) << want.ids;
  EXPECT_TRUE(torch::equal(got.ids, torch::tensor(aimed))) << got.ids;
  EXPECT_LT((got.logprobs - want.logprobs).abs().max().item<double>(), 1e-5);
}

class DeviceLoopFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { at::set_num_threads(1); }
};

TEST_P(DeviceLoopFixture, GreedyIdsEqualTransformersAndTheHostLoop) {
  auto m = load(GetParam());
  auto e = test::expected_json(GetParam());
  std::vector<Request> reqs;
  for (const auto& g : e["generation"].GetArray()) {
    Request r;
    r.prompt = ints(g["prompt_ids"]);
    r.sampling.temperature = 0;
    r.max_new_tokens = static_cast<int64_t>(g["new_ids"].Size());
    r.stop_ids = {2};
    reqs.push_back(r);
  }
  Engine alone(m, opts(1, Mode::kOn));
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto got = alone.generate({reqs[i]});
    EXPECT_TRUE(alone.last_stats().device_loop);
    EXPECT_EQ(got[0][0].ids, ints(e["generation"][static_cast<rapidjson::SizeType>(i)]["new_ids"])) << "prompt " << i;
  }
  Engine batched(m, opts(3, Mode::kOn));
  auto got = batched.generate(reqs);
  const auto& want = e["generation_batched_left_padded"]["new_ids"];
  for (size_t i = 0; i < reqs.size(); ++i)
    EXPECT_EQ(got[i][0].ids, ints(want[static_cast<rapidjson::SizeType>(i)])) << "batched prompt " << i;
  Engine host(m, opts(3, Mode::kOff));
  auto ref = host.generate(reqs);
  EXPECT_FALSE(host.last_stats().device_loop);
  const double worst = expect_same_samples(got, ref, 1e-4);
  std::printf("  greedy, device vs host loop: max |logprob diff| %.2e\n", worst);
  // One device->host copy per step; a host->device copy only on steps after admissions or frees.
  const auto& st = batched.last_stats();
  EXPECT_EQ(st.d2h_copies, st.decode_steps);
  EXPECT_GE(st.h2d_copies, 1);
  EXPECT_LE(st.h2d_copies, st.decode_steps);
  EXPECT_EQ(st.graph_replays, 0);  // CPU: no graphs
}

// Sampled ids and log-probs equal the host loop's for the same seeds: refills (11 samples through 4
// slots), shared prompts (prefill fan-out and late prefix copies), a one-token prompt, temperatures,
// top-k, top-p, stop ids, a vocabulary limit.
TEST_P(DeviceLoopFixture, SampledIdsEqualTheHostLoopWithRefillsAndSharedPrompts) {
  auto m = load(GetParam());
  auto reqs = mixed_requests(GetParam());
  reqs.back().sampling = {1.0, 0.8, 5};
  reqs.back().max_new_tokens = 14;
  // A stop id that the unconstrained samples hit: the first sampled token of request 2's sample 0.
  Engine probe(m, opts(4, Mode::kOff));
  const int64_t stop = probe.generate(reqs)[2][0].ids[2];
  for (auto& r : reqs) r.stop_ids = {stop};
  for (int64_t limit : {int64_t{0}, int64_t{300}}) {
    auto on = opts(4, Mode::kOn), off = opts(4, Mode::kOff);
    on.vocab_limit = off.vocab_limit = limit;
    Engine dev(m, on), host(m, off);
    auto a = dev.generate(reqs);
    auto b = host.generate(reqs);
    EXPECT_GT(dev.last_stats().prefix_copies, 0);
    const double worst = expect_same_samples(a, b, 1e-4);
    std::printf("  vocab_limit %lld: max |logprob diff| device vs host loop %.2e\n", static_cast<long long>(limit), worst);
    int stopped = 0;
    for (const auto& req : a)
      for (const auto& s : req) {
        stopped += s.finish_reason == FinishReason::kStop;
        for (int64_t id : s.ids) EXPECT_LT(id, limit > 0 ? limit : 512);
      }
    if (limit == 0) {
      EXPECT_GT(stopped, 0);
    }
    EXPECT_EQ(dev.last_stats().d2h_copies, dev.last_stats().decode_steps);
    EXPECT_LE(dev.last_stats().h2d_copies, dev.last_stats().decode_steps);
  }
}

INSTANTIATE_TEST_SUITE_P(HF, DeviceLoopFixture, ::testing::Values("tiny-tied", "tiny-untied"));

// A long cache (max_len 300) read in key-length buckets (64, then 128 as the samples pass position
// 63): the same samples as the host loop, which reads each slot's own length.
TEST_P(DeviceLoopFixture, KeyLengthBucketsGiveTheHostLoopsSamples) {
  auto m = load(GetParam());
  std::vector<Request> reqs(2);
  reqs[0].prompt = {3, 4, 5, 6, 7};
  reqs[0].samples = 3;
  reqs[0].seed = 21;
  reqs[0].max_new_tokens = 90;
  reqs[1].prompt = {9};
  reqs[1].samples = 2;
  reqs[1].seed = 22;
  reqs[1].sampling.temperature = 0.0;
  reqs[1].max_new_tokens = 70;
  auto on = opts(4, Mode::kOn), off = opts(4, Mode::kOff);
  on.max_len = off.max_len = 300;
  Engine dev(m, on), host(m, off);
  auto a = dev.generate(reqs);
  auto b = host.generate(reqs);
  EXPECT_EQ(a[0][0].ids.size(), 90u);
  const double worst = expect_same_samples(a, b, 1e-4);
  std::printf("  key-length buckets, device vs host loop: max |logprob diff| %.2e\n", worst);
}

TEST(DeviceLoop, StopStringsCutWhereTheHostLoopCuts) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  auto table = std::make_shared<std::vector<std::string>>();
  for (int i = 0; i < 512; ++i) table->push_back("<" + std::to_string(i) + ">");
  Request r;
  r.prompt = {469, 148, 85, 228, 488, 493};
  r.sampling.temperature = 0;
  r.max_new_tokens = 12;
  auto host_opts = opts(2, Mode::kOff);
  host_opts.token_bytes = table;
  Engine host(m, host_opts);
  const auto full = host.generate({r})[0][0].ids;
  ASSERT_EQ(full.size(), 12u);
  Request t = r;
  t.stop_strings = {"never-there", std::to_string(full[4]) + "><" + std::to_string(full[5]).substr(0, 1)};
  Request u = r;
  u.samples = 3;
  u.sampling.temperature = 1.0;
  u.seed = 17;
  u.stop_strings = {"1"};
  auto dev_opts = host_opts;
  dev_opts.device_loop = Mode::kOn;
  Engine dev(m, dev_opts);
  auto a = dev.generate({t, r, u});
  auto b = host.generate({t, r, u});
  expect_same_samples(a, b, 1e-4);
  EXPECT_EQ(a[0][0].finish_reason, FinishReason::kStop);
  EXPECT_EQ(a[0][0].stop_string, t.stop_strings[1]);
  EXPECT_EQ(a[1][0].ids, full);
}

// LoRA adapters attached (and updated in place between calls): the device step applies them live.
TEST(DeviceLoop, LoraAdaptersApplyLive) {
  at::set_num_threads(1);
  auto m = load("tiny-tied");
  torch::NoGradGuard ng;
  model::LoraOptions lo;
  lo.rank = 4;
  auto lora = model::Lora::attach(m, lo, 5);
  std::vector<Request> reqs(2);
  reqs[0].prompt = {3, 4, 5};
  reqs[0].samples = 3;
  reqs[0].seed = 7;
  reqs[0].max_new_tokens = 12;
  reqs[1].prompt = {9, 8, 7, 6, 5};
  reqs[1].sampling.temperature = 0;
  reqs[1].max_new_tokens = 10;
  Engine dev(m, opts(2, Mode::kOn)), host(m, opts(2, Mode::kOff));
  auto before = dev.generate(reqs);
  expect_same_samples(before, host.generate(reqs), 1e-4);
  torch::manual_seed(1);
  for (auto& [name, t] : lora.named_parameters())
    if (name.find("lora_B") != std::string::npos) t.add_(torch::randn_like(t) * 0.5);
  auto after = dev.generate(reqs);
  expect_same_samples(after, host.generate(reqs), 1e-4);
  EXPECT_NE(after[1][0].ids, before[1][0].ids) << "the update should change the greedy continuation";
}

TEST(DeviceLoop, CacheSlotsThatFitTheMemoryFraction) {
  const size_t GiB = size_t{1} << 30;
  // 80 GiB card, 20 GiB in use (60 free), fraction 0.9: 72 - 20 = 52 GiB for slots of 1 GiB.
  EXPECT_EQ(cache_slots_that_fit(64, int64_t{1} << 30, 0.9, 60 * GiB, 80 * GiB), 52);
  EXPECT_EQ(cache_slots_that_fit(32, int64_t{1} << 30, 0.9, 60 * GiB, 80 * GiB), 32);  // capped at what was asked
  // 2.5 slots' worth: 2.
  EXPECT_EQ(cache_slots_that_fit(8, int64_t{2} << 30, 0.5, 45 * GiB, 80 * GiB), 2);  // 40 - 35 = 5 GiB
  // In use above the fraction: not even one slot, and the error says which key to change.
  try {
    cache_slots_that_fit(8, int64_t{1} << 30, 0.5, 30 * GiB, 80 * GiB);
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("rollout.gpu_memory_fraction"), std::string::npos) << err.what();
  }
  EXPECT_THROW(cache_slots_that_fit(8, int64_t{1} << 30, 1.5, 30 * GiB, 80 * GiB), Error);
  // On the CPU the fraction is ignored: the slots asked for.
  auto m = load("tiny-tied");
  EngineOptions o = opts(5, Mode::kOn);
  o.gpu_memory_fraction = 1e-9;
  Engine eng(m, o);
  Request r;
  r.prompt = {1, 2, 3};
  r.max_new_tokens = 2;
  eng.generate({r});
  EXPECT_EQ(eng.last_stats().slots, 5);
}

}  // namespace
}  // namespace ptk::rollout
