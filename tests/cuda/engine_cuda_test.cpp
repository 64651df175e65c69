// The rollout engine's device loop on a CUDA GPU (skipped elsewhere): greedy ids equal the CPU
// host loop's on the HF fixtures (float32), CUDA-graph replay equals eager decoding (same ids, same
// log-probs), one device->host copy per step, graphs captured and replayed, the KV cache sized from
// rollout.gpu_memory_fraction. Built into cuda_test (scripts/gpu_check.sh runs it).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/qwen2.h"
#include "core/util/error.h"
#include "rollout/engine.h"
#include "tests/model/hf_fixture.h"
#include "tests/support/test_util.h"

namespace ptk::rollout {
namespace {

using model::Qwen2Model;
using Mode = EngineOptions::DeviceLoopMode;

bool gpu() { return torch::cuda::is_available(); }
#define PTK_NEED_GPU() \
  if (!gpu()) PTK_SKIP_WITHOUT("gpu") << "no usable CUDA GPU on this machine (ptk info says why); runs on a GPU machine"

using test::ints;

Qwen2Model load(const std::string& cfg, at::Device dev, at::ScalarType dtype) {
  model::LoadOptions lo;
  lo.device = dev;
  lo.dtype = dtype;
  return Qwen2Model::from_pretrained(test::fixture_dir(cfg) + "/checkpoint", lo);
}

// The fixtures' greedy prompts plus sampled requests with shared prompts, top-k / top-p, refills.
std::vector<Request> requests(const std::string& cfg) {
  auto e = test::expected_json(cfg);
  std::vector<Request> reqs;
  int i = 0;
  for (const auto& g : e["generation"].GetArray()) {
    Request r;
    r.prompt = ints(g["prompt_ids"]);
    r.sampling.temperature = 0;
    r.max_new_tokens = static_cast<int64_t>(g["new_ids"].Size());
    reqs.push_back(r);
    Request s = r;
    s.samples = 3;
    s.seed = 40 + i;
    s.sampling = {0.8, i == 1 ? 0.9 : 1.0, i == 2 ? 15 : 0};
    s.max_new_tokens = 5 + 4 * i;
    reqs.push_back(s);
    ++i;
  }
  return reqs;
}

class EngineCuda : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineCuda, DeviceLoopGreedyEqualsCpuAndGraphsEqualEager) {
  PTK_NEED_GPU();
  const auto reqs = requests(GetParam());
  auto cpu = load(GetParam(), at::kCPU, at::kFloat);
  EngineOptions host_opts;
  host_opts.slots = 4;
  host_opts.device_loop = Mode::kOff;
  auto ref = Engine(cpu, host_opts).generate(reqs);

  auto m = load(GetParam(), at::Device(at::kCUDA, 0), at::kFloat);
  EngineOptions o;
  o.slots = 4;  // 4 slots, 12 samples: refills, buckets 1..4
  o.cuda_graphs = true;
  Engine graphs(m, o);
  auto a = graphs.generate(reqs);
  const auto& st = graphs.last_stats();
  EXPECT_TRUE(st.device_loop);
  EXPECT_GE(st.graph_captures, 1);
  EXPECT_GE(st.graph_replays, 1);
  EXPECT_EQ(st.graph_captures + st.graph_replays, st.decode_steps);
  EXPECT_EQ(st.d2h_copies, st.decode_steps);
  EXPECT_LE(st.h2d_copies, st.decode_steps);
  std::printf("  %lld steps: %lld graph captures, %lld replays, %lld H2D, %lld D2H copies\n",
              static_cast<long long>(st.decode_steps), static_cast<long long>(st.graph_captures),
              static_cast<long long>(st.graph_replays), static_cast<long long>(st.h2d_copies),
              static_cast<long long>(st.d2h_copies));
  o.cuda_graphs = false;
  Engine eager(m, o);
  auto b = eager.generate(reqs);
  EXPECT_EQ(eager.last_stats().graph_captures + eager.last_stats().graph_replays, 0);
  double worst_cpu = 0;
  for (size_t i = 0; i < reqs.size(); ++i)
    for (size_t g = 0; g < a[i].size(); ++g) {
      EXPECT_EQ(a[i][g].ids, b[i][g].ids) << "graphs vs eager, request " << i << " sample " << g;
      EXPECT_EQ(a[i][g].logprobs, b[i][g].logprobs) << "graphs vs eager, request " << i << " sample " << g;
      if (reqs[i].sampling.greedy()) {
        EXPECT_EQ(a[i][g].ids, ref[i][g].ids) << "greedy vs the CPU, request " << i;
      }
      if (a[i][g].ids == ref[i][g].ids)
        for (size_t t = 0; t < a[i][g].logprobs.size(); ++t)
          worst_cpu = std::max(worst_cpu, double(std::abs(a[i][g].logprobs[t] - ref[i][g].logprobs[t])));
    }
  std::printf("  float32 CUDA device loop vs CPU host loop: max |logprob diff| %.2e\n", worst_cpu);
  EXPECT_LT(worst_cpu, 1e-3);

  // bf16: graphs and eager run the same kernels: the same ids and log-probs.
  auto h = load(GetParam(), at::Device(at::kCUDA, 0), at::kBFloat16);
  o.cuda_graphs = true;
  auto c = Engine(h, o).generate(reqs);
  o.cuda_graphs = false;
  auto d = Engine(h, o).generate(reqs);
  for (size_t i = 0; i < reqs.size(); ++i)
    for (size_t g = 0; g < c[i].size(); ++g) {
      EXPECT_EQ(c[i][g].ids, d[i][g].ids) << "bf16 graphs vs eager, request " << i << " sample " << g;
      EXPECT_EQ(c[i][g].logprobs, d[i][g].logprobs);
    }
}

INSTANTIATE_TEST_SUITE_P(HF, EngineCuda, ::testing::Values("tiny-tied", "tiny-untied"));

TEST(EngineCudaMemory, SlotsSizedFromTheMemoryFraction) {
  PTK_NEED_GPU();
  auto m = load("tiny-tied", at::Device(at::kCUDA, 0), at::kFloat);
  Request r;
  r.prompt = {1, 2, 3};
  r.max_new_tokens = 4;
  EngineOptions o;
  o.slots = 8;
  o.gpu_memory_fraction = 0.9;
  Engine eng(m, o);
  eng.generate({r});
  EXPECT_EQ(eng.last_stats().slots, 8);  // a tiny model: every slot fits
  o.gpu_memory_fraction = 1e-6;          // ~140 KB of an H100: not one slot
  Engine none(m, o);
  try {
    none.generate({r});
    ADD_FAILURE() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("rollout.gpu_memory_fraction"), std::string::npos) << err.what();
  }
}

}  // namespace
}  // namespace ptk::rollout
