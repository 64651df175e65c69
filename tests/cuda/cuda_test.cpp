// ptk on a GPU: what `ptk info` reports, and the model on CUDA against HF transformers' fixture
// (fp32 logits and every gradient, attention through the fused SDPA kernels that kAuto picks on
// CUDA) and against the same model on the CPU in bf16. Each test skips with a message where no
// GPU is usable; the reports still run on every machine.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/qwen2.h"
#include "core/runtime/runtime.h"
#include "tests/model/hf_fixture.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

using model::ForwardInput;
using model::Qwen2Model;
using test::compare;
using test::fixture_dir;

bool gpu() { return torch::cuda::is_available(); }
#define PTK_NEED_GPU() \
  if (!gpu()) PTK_SKIP_WITHOUT("gpu") << "no usable CUDA GPU on this machine (ptk info says why); runs on a GPU machine"

TEST(CudaRuntime, InfoReportsWhatWasCompiledIn) {
  auto info = runtime::init(1);
  const std::string d = runtime::describe(info);
  std::printf("%s", d.c_str());
  EXPECT_EQ(info.cuda_compiled, PTK_TORCH_CUDA != 0);
  EXPECT_NE(d.find("OpenMP: "), std::string::npos);
  EXPECT_EQ(d.find("more than one OpenMP runtime"), std::string::npos) << d;
  if (info.cuda_compiled) {
    EXPECT_FALSE(info.cuda_runtime.empty()) << d;
    EXPECT_FALSE(info.cudnn.empty()) << d;
    EXPECT_FALSE(info.nccl.empty()) << d;
  }
  EXPECT_EQ(info.cuda_available, gpu());
  if (gpu()) {
    EXPECT_NE(info.device.find("cuda"), std::string::npos) << info.device;
  }
}

class CudaFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaFixture, LogitsAndGradientsMatchTransformers) {
  PTK_NEED_GPU();
  torch::globalContext().setAllowTF32CuBLAS(false);  // fp32 matmuls as the fixture computed them
  const at::Device cuda(at::kCUDA, 0);
  model::LoadOptions lo;
  lo.device = cuda;
  auto m = Qwen2Model::from_pretrained(fixture_dir(GetParam()) + "/checkpoint", lo);
  m.set_requires_grad(true);
  auto ex = test::expected_tensors(GetParam());
  auto b = test::load_batch(GetParam(), "right_padded");
  auto out = m.forward(ForwardInput{b.ids.to(cuda), {}, b.mask.to(cuda), {}});
  ASSERT_TRUE(out.logits.is_cuda());
  PTK_EXPECT_CLOSE("cuda logits", compare(out.logits.cpu(), ex.at("right.logits"), b.mask, 1e-4, 1e-4));
  auto V = out.logits.size(-1);
  auto loss = torch::nn::functional::cross_entropy(
      out.logits.narrow(1, 0, out.logits.size(1) - 1).reshape({-1, V}),
      b.labels.narrow(1, 1, b.labels.size(1) - 1).reshape({-1}).to(cuda),
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
  loss.backward();
  for (const auto& [name, p] : m.named_parameters()) {
    ASSERT_TRUE(p.grad().defined()) << name;
    ASSERT_TRUE(p.grad().is_cuda()) << name;
    PTK_EXPECT_CLOSE("cuda grad." + name, compare(p.grad().cpu(), ex.at("grad." + name), {}, 2e-5, 2e-3));
  }
}

TEST_P(CudaFixture, Bf16OnCudaTracksFp32OnCpu) {
  PTK_NEED_GPU();
  model::LoadOptions lo;
  lo.device = at::Device(at::kCUDA, 0);
  lo.dtype = at::kBFloat16;
  auto m = Qwen2Model::from_pretrained(fixture_dir(GetParam()) + "/checkpoint", lo);
  auto ex = test::expected_tensors(GetParam());
  auto b = test::load_batch(GetParam(), "right_padded");
  torch::NoGradGuard ng;
  auto out = m.forward(ForwardInput{b.ids.to(lo.device), {}, b.mask.to(lo.device), {}});
  EXPECT_EQ(out.logits.scalar_type(), at::kBFloat16);
  // bf16 keeps 8 bits of mantissa: the logits of these tiny models agree to a few hundredths.
  PTK_EXPECT_CLOSE("bf16 cuda logits", compare(out.logits.to(at::kFloat).cpu(), ex.at("right.logits"), b.mask, 5e-2, 5e-2));
}

INSTANTIATE_TEST_SUITE_P(HF, CudaFixture, ::testing::Values("tiny-tied", "tiny-untied"));

}  // namespace
}  // namespace ptk
