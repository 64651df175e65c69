// The device side of the step loop: the CUDA-only functions answer "unknown" or refuse cleanly
// without a GPU (every machine), the GPU peak table, the checkpoints' generator states; on a GPU,
// AdamW's multi-tensor path and _foreach clipping against the CPU, the CUDA generator round trip, the
// caching allocator's stats and the device's MFU peak (skipped with a message elsewhere).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/optim/adamw.h"
#include "core/optim/clip.h"
#include "core/runtime/device_memory.h"
#include "core/train/device_peak.h"
#include "core/train/peak_flops.h"
#include "core/train/rng_state.h"
#include "core/util/error.h"
#include "tests/support/test_util.h"

namespace ptk::train {
namespace {

bool gpu() { return torch::cuda::is_available(); }
#define PTK_NEED_GPU() \
  if (!gpu()) PTK_SKIP_WITHOUT("gpu") << "no usable CUDA GPU on this machine; runs on a GPU machine"

TEST(GpuPeak, TableByDeviceName) {
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA H100 80GB HBM3", true), 989.4e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA H100 80GB HBM3", false), 66.9e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA H100 PCIe", true), 756.5e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA H100 NVL", true), 835.5e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA H200", true), 989.4e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA H200 NVL", true), 835.5e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA GH200 480GB", true), 989.4e12);
  EXPECT_DOUBLE_EQ(known_gpu_peak_flops("NVIDIA A100-SXM4-80GB", true), 312e12);
  EXPECT_EQ(known_gpu_peak_flops("NVIDIA GeForce RTX 4090", true), 0);  // measured instead
  EXPECT_EQ(known_gpu_peak_flops("", false), 0);
}

// Without a GPU: no peak (no MFU, said why), no allocator stats, run.device resolves to the CPU
// for auto and refuses cuda with resolve_device's message.
TEST(DeviceFunctions, AnswerUnknownOrRefuseWithoutGpu) {
  if (gpu()) GTEST_SKIP() << "a GPU is here: the GPU tests below cover these functions";
  const DevicePeak p = cuda_peak_flops(0, true);
  EXPECT_EQ(p.flops, 0);
  EXPECT_EQ(p.source.rfind("unknown: ", 0), 0u) << p.source;
  EXPECT_EQ(measure_cuda_gemm_flops(0, true, 64, 1), 0);
  runtime::CudaMemoryStats stats;
  stats.allocated = 42;
  EXPECT_FALSE(runtime::cuda_memory_stats(0, &stats, true));
  EXPECT_EQ(stats.allocated, 42);  // untouched
  size_t free_bytes = 0, total = 0;
  EXPECT_FALSE(runtime::cuda_free_memory(0, &free_bytes, &total));
  EXPECT_EQ(runtime::cuda_index_of("auto"), -1);
  EXPECT_EQ(runtime::cuda_index_of("cpu"), -1);
  EXPECT_EQ(runtime::cuda_index_of("meta"), -1);
  EXPECT_EQ(runtime::cuda_index_of(""), -1);  // unset: auto
  try {
    runtime::cuda_index_of("cuda:0");
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("run.device"), std::string::npos) << e.what();
  }
}

// The CPU generator's state goes into every checkpoint and comes back; a checkpoint from a GPU run
// (with torch_cuda) restores on the CPU with a note; one without torch_cpu is refused.
TEST(RngState, CpuRoundTripAndCudaEntryIgnoredOnCpu) {
  const at::Device cpu(at::kCPU);
  torch::manual_seed(123);
  auto saved = rng_state(cpu);
  ASSERT_EQ(saved.size(), 1u);
  EXPECT_EQ(saved[0].first, "torch_cpu");
  const at::Tensor a = torch::rand({8});
  std::map<std::string, at::Tensor> m(saved.begin(), saved.end());
  torch::manual_seed(999);
  EXPECT_EQ(restore_rng_state(m, cpu, "rng.safetensors"), "");
  EXPECT_TRUE(torch::equal(torch::rand({8}), a));
  m["torch_cuda"] = at::zeros({16}, at::kByte);
  const std::string note = restore_rng_state(m, cpu, "rng.safetensors");
  EXPECT_NE(note.find("torch_cuda"), std::string::npos) << note;
  EXPECT_TRUE(torch::equal(torch::rand({8}), a));
  m.erase("torch_cpu");
  EXPECT_THROW(restore_rng_state(m, cpu, "rng.safetensors"), Error);
}

// On a GPU: torch_cuda is saved beside torch_cpu and restores the CUDA generator; a checkpoint
// without it resumes with a note.
TEST(RngState, CudaRoundTrip) {
  PTK_NEED_GPU();
  const at::Device dev(at::kCUDA, 0);
  torch::manual_seed(5);
  auto saved = rng_state(dev);
  ASSERT_EQ(saved.size(), 2u);
  EXPECT_EQ(saved[1].first, "torch_cuda");
  const at::Tensor a = torch::rand({8}, torch::TensorOptions().device(dev)).cpu();
  torch::manual_seed(6);
  std::map<std::string, at::Tensor> m(saved.begin(), saved.end());
  EXPECT_EQ(restore_rng_state(m, dev, "rng.safetensors"), "");
  EXPECT_TRUE(torch::equal(torch::rand({8}, torch::TensorOptions().device(dev)).cpu(), a));
  m.erase("torch_cuda");
  EXPECT_NE(restore_rng_state(m, dev, "rng.safetensors").find("no torch_cuda"), std::string::npos);
}

// runtime::pinned_host_bytes: exactly the bytes asked for, writable, page-locked where there is a GPU
// (then a non_blocking upload of a view of it arrives intact), plain memory elsewhere.
TEST(CudaPinnedHostBytes, ExactSizeLockedOnAGpu) {
  bool pinned = true;
  at::Tensor b = runtime::pinned_host_bytes(1000003, &pinned);
  EXPECT_EQ(b.numel(), 1000003);
  EXPECT_EQ(b.scalar_type(), at::kByte);
  EXPECT_TRUE(b.device().is_cpu());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data_ptr()) % 4096, 0u);
  auto f = b.narrow(0, 64, 4 * 1000).view(at::kFloat);
  f.copy_(torch::arange(1000, torch::kFloat));
  EXPECT_EQ(pinned, gpu());
  if (!gpu()) return;
  EXPECT_TRUE(b.is_pinned());
  auto d = f.to(at::Device(at::kCUDA, 0), at::kFloat, /*non_blocking=*/true);
  EXPECT_TRUE(torch::equal(d.cpu(), torch::arange(1000, torch::kFloat)));
}

// On a GPU: the multi-tensor AdamW on CUDA (fp32, and bf16 with fp32 masters) against the reference
// path on the CPU, and the _foreach clip against the CPU's.
TEST(CudaLoop, AdamWAndClipMatchTheCpu) {
  PTK_NEED_GPU();
  const at::Device dev(at::kCUDA, 0);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    torch::manual_seed(3);
    auto w = torch::randn({129, 65}).to(torch::kBFloat16).to(torch::kFloat32);
    auto b = torch::randn({65}).to(torch::kBFloat16).to(torch::kFloat32);
    auto pc = w.to(dtype).set_requires_grad(true), bc = b.to(dtype).set_requires_grad(true);
    auto pg = w.to(dev, dtype).set_requires_grad(true), bg = b.to(dev, dtype).set_requires_grad(true);
    optim::AdamWOptions o{0.9, 0.95, 1e-8, 0.1, false};
    optim::AdamW ac({{"x.weight", pc}, {"x.bias", bc}}, o), ag({{"x.weight", pg}, {"x.bias", bg}}, o);
    ac.set_fused(false);
    EXPECT_EQ(ag.path(), optim::AdamWPath::kMultiTensor);
    for (int step = 0; step < 5; ++step) {
      auto g1 = (torch::randn({129, 65}) * (step + 1)).to(dtype), g2 = torch::randn({65}).to(dtype);
      pc.mutable_grad() = g1.clone();
      bc.mutable_grad() = g2.clone();
      pg.mutable_grad() = g1.to(dev);
      bg.mutable_grad() = g2.to(dev);
      const double nc = optim::clip_grad_norm_tensor({pc, bc}, 1.0).item<double>();
      at::Tensor ng = optim::clip_grad_norm_tensor({pg, bg}, 1.0);
      EXPECT_TRUE(ng.is_cuda());
      EXPECT_NEAR(ng.item<double>(), nc, 1e-5 * nc);
      ac.step(1e-2);
      ag.step(1e-2);
    }
    auto sc = ac.state(), sg = ag.state();
    ASSERT_EQ(sc.size(), sg.size());
    for (size_t i = 0; i < sc.size(); ++i) {
      const double d = ((sg[i].second.cpu() - sc[i].second).abs() / sc[i].second.abs().clamp_min(1.0)).max().item<double>();
      EXPECT_LT(d, 1e-5) << sc[i].first << " " << c10::toString(dtype);
    }
    EXPECT_LT((pg.cpu().to(torch::kFloat32) - pc.to(torch::kFloat32)).abs().max().item<double>(),
              dtype == torch::kFloat32 ? 1e-5 : 1e-2);
  }
}

// On a GPU: the allocator's stats see an allocation and the peak resets; the MFU peak is the table's
// for an H100/H200, else a measured GEMM (> 0 either way).
TEST(CudaLoop, MemoryStatsAndPeak) {
  PTK_NEED_GPU();
  runtime::CudaMemoryStats s0, s1, s2;
  ASSERT_TRUE(runtime::cuda_memory_stats(0, &s0, true));
  {
    auto big = torch::empty({64 << 20}, torch::TensorOptions().device(torch::kCUDA, 0));  // 256 MiB
    ASSERT_TRUE(runtime::cuda_memory_stats(0, &s1, false));
    EXPECT_GE(s1.allocated - s0.allocated, 256.0 * (1 << 20));
  }
  ASSERT_TRUE(runtime::cuda_memory_stats(0, &s2, true));
  EXPECT_GE(s2.peak_allocated, s1.allocated);  // the peak since the reset saw the 256 MiB
  ASSERT_TRUE(runtime::cuda_memory_stats(0, &s1, true));
  EXPECT_LT(s1.peak_allocated, s2.peak_allocated);  // reset: the freed 256 MiB are no longer the peak
  EXPECT_EQ(runtime::cuda_index_of("cuda:0"), 0);
  const DevicePeak p = cuda_peak_flops(0, true);
  std::printf("peak: %s %.1f TFLOP/s\n", p.source.c_str(), p.flops / 1e12);
  EXPECT_GT(p.flops, 0) << p.source;
}

}  // namespace
}  // namespace ptk::train
