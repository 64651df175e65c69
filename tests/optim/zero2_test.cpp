// Zero2AdamW on one rank (no process group) against AdamW + clip_grad_norm_tensor over whole
// gradients, one body per device (cpu; cuda where a GPU is usable) and dtype: gradients moved into
// buckets by the post-accumulate-grad hook (.grad freed), two micro-batches summed in the shard, the
// clip (active), the step, the shard's state and its layout check. Several ranks: tests/parallel
// (comm_test's reduce-scatter, dp_trainer_test's ZeRO-2 runs).
#include "core/optim/zero2.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>

#include "core/optim/clip.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"

namespace ptk::optim {
namespace {

struct Case {
  const char* device;
  at::ScalarType dtype;
};

class Zero2OneRank : public ::testing::TestWithParam<Case> {};

NamedTensors make_params(const at::TensorOptions& o) {
  torch::manual_seed(7);
  NamedTensors p;
  // First: its bucket is the last, launched only at end_backward (buckets go in order).
  p.emplace_back("unused", torch::randn({5}).to(o).requires_grad_());  // never in the loss
  p.emplace_back("w1", (torch::randn({32, 16}) * 0.3).to(o).requires_grad_());
  p.emplace_back("b1.bias", (torch::randn({32}) * 0.1).to(o).requires_grad_());
  p.emplace_back("w2", (torch::randn({8, 32}) * 0.3).to(o).requires_grad_());
  return p;
}

at::Tensor loss_of(const NamedTensors& p, int step, int mb, const at::TensorOptions& o) {
  torch::manual_seed(100 + 10 * step + mb);
  auto x = torch::randn({6, 16}).to(o);
  auto h = torch::tanh(torch::matmul(x, p[1].second.t()) + p[2].second);
  return torch::matmul(h, p[3].second.t()).square().sum() * 3.0;
}

TEST_P(Zero2OneRank, EqualsAdamWOnWholeGradients) {
  const Case c = GetParam();
  if (std::string(c.device) == "cuda" && !torch::cuda::is_available())
    PTK_SKIP_WITHOUT("gpu") << "no usable CUDA GPU on this machine; runs on a GPU machine";
  const auto o = at::TensorOptions().dtype(c.dtype).device(at::Device(c.device));
  AdamWOptions ao{0.9, 0.95, 1e-8, 0.01, false};
  auto ref = make_params(o), sharded = make_params(o);
  const at::Tensor unused_start = sharded[0].second.detach().clone();
  std::vector<at::Tensor> ref_tensors;
  for (auto& [n, t] : ref) ref_tensors.push_back(t);
  AdamW adamw(ref, ao);
  // Buckets of 1 KiB (262 fp32 elements; whole parameters, backward's order): w2 | b1 | w1 | unused.
  const double bucket_mb = 0.001 * at::elementSize(c.dtype) / 4;
  Zero2AdamW z(parallel::Comm(), sharded, ao, bucket_mb);
  EXPECT_GE(z.num_buckets(), 3);
  EXPECT_EQ(z.numel(), 32 * 16 + 32 + 5 + 8 * 32);
  EXPECT_EQ(z.shard_numel(), z.numel()) << "one rank owns everything, unpadded";
  const double max_norm = 0.5;
  for (int step = 0; step < 3; ++step) {
    for (int mb = 0; mb < 2; ++mb) {
      loss_of(ref, step, mb, o).backward();
      z.begin_backward();
      loss_of(sharded, step, mb, o).backward();
      z.end_backward();
      EXPECT_GE(z.launched_during_backward(), 2) << "buckets did not start before backward ended";
      for (auto& [n, t] : sharded) EXPECT_FALSE(t.grad().defined()) << n << ": .grad outlived its bucket";
    }
    const double want = clip_grad_norm_tensor(ref_tensors, max_norm).item<double>();
    const double got = z.clip_grad_norm(max_norm).item<double>();
    EXPECT_NEAR(got / want, 1.0, c.dtype == at::kFloat ? 1e-6 : 1e-3) << "step " << step;
    if (step == 0) EXPECT_GT(want, 2 * max_norm) << "the clip must act for the comparison to mean something";
    adamw.step(1e-2);
    z.step(1e-2);
    adamw.zero_grad();
    z.zero_grad();
  }
  EXPECT_EQ(z.steps(), 3);
  // fp32 weights (bf16 parameters: their fp32 masters) after 3 steps; they differ only in how the
  // norm was summed (fp32 vs fp64 squares), i.e. the clip factor's last bits. With bf16 gradients that
  // can flip a clipped gradient's rounding by one bf16 ulp (2^-8 relative), which AdamW passes on as up
  // to ~lr * 2^-8 a step (measured 6.5e-5 after 3 steps); a wrong shard or a lost micro-batch would
  // move the weights by ~lr = 1e-2.
  const double tol = c.dtype == at::kFloat ? 1e-6 : 3 * 1e-2 / 256;
  auto ref_state = adamw.state();
  auto z_state = z.state();
  std::map<std::string, at::Tensor> zs(z_state.begin(), z_state.end());
  double moved = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const std::string& n = ref[i].first;
    at::Tensor a = ref[i].second.detach().to(at::kCPU, at::kFloat), b = sharded[i].second.detach().to(at::kCPU, at::kFloat);
    if (c.dtype != at::kFloat && n != "unused") {
      a = [&] {
        for (auto& [k, t] : ref_state)
          if (k == "master." + n) return t.to(at::kCPU);
        return at::Tensor();
      }();
      ASSERT_TRUE(zs.count("master." + n)) << n;
      b = zs.at("master." + n).to(at::kCPU);
    }
    ASSERT_TRUE(a.defined()) << n;
    EXPECT_LE((a.reshape(-1) - b.reshape(-1)).abs().max().item<double>(), tol) << n;
    moved = std::max(moved, (sharded[i].second.detach().to(at::kCPU, at::kFloat) -
                             make_params(o)[i].second.detach().to(at::kCPU, at::kFloat)).abs().max().item<double>());
    ASSERT_TRUE(zs.count("zero2.range." + n)) << n;
    EXPECT_EQ(zs.at("zero2.range." + n)[1].item<int64_t>(), sharded[i].second.numel()) << n;
  }
  EXPECT_GT(moved, 1e-2) << "3 steps at lr 1e-2 did not move the weights";
  EXPECT_TRUE(torch::equal(sharded[0].second.detach(), unused_start)) << "a parameter without gradients moved";

  // The shard's state loads into a fresh optimizer; one cut for another layout is refused.
  Zero2AdamW again(parallel::Comm(), make_params(o), ao, bucket_mb);
  again.load_state(z_state, z.steps());
  EXPECT_EQ(again.steps(), 3);
  NamedTensors bad = z_state;
  for (auto& [n, t] : bad)
    if (n == "zero2.range.w1") t = at::tensor({int64_t(0), int64_t(7)}, at::kLong);
  Zero2AdamW third(parallel::Comm(), make_params(o), ao, bucket_mb);
  try {
    third.load_state(bad, 3);
    ADD_FAILURE() << "a shard of another layout was loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("was cut for another layout (w1 elements 0..512 expected)"), std::string::npos)
        << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, Zero2OneRank,
                         ::testing::Values(Case{"cpu", at::kFloat}, Case{"cpu", at::kBFloat16}, Case{"cuda", at::kFloat},
                                           Case{"cuda", at::kBFloat16}),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return std::string(i.param.device) + (i.param.dtype == at::kFloat ? "_fp32" : "_bf16");
                         });

}  // namespace
}  // namespace ptk::optim
