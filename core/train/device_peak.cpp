#include "core/train/device_peak.h"

#include <torch/torch.h>
#if PTK_TORCH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <chrono>

#include "core/train/peak_flops.h"

namespace ptk::train {

double measure_cuda_gemm_flops(int device, bool bf16, int n, int reps) {
#if PTK_TORCH_CUDA
  if (device < 0 || !torch::cuda::is_available() || device >= static_cast<int>(torch::cuda::device_count()))
    return 0;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  torch::NoGradGuard ng;
  auto opts = torch::TensorOptions().device(torch::kCUDA, device).dtype(bf16 ? torch::kBFloat16 : torch::kFloat32);
  auto a = torch::randn({n, n}, opts), b = torch::randn({n, n}, opts);
  auto c = torch::mm(a, b);  // warm-up: cuBLAS handle, workspace, kernel choice
  torch::cuda::synchronize(device);
  double best = 1e30;
  for (int i = 0; i < std::max(1, reps); ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    torch::mm_out(c, a, b);
    torch::cuda::synchronize(device);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * n * static_cast<double>(n) * n / best;
#else
  (void)device, (void)bf16, (void)n, (void)reps;
  return 0;
#endif
}

DevicePeak cuda_peak_flops(int device, bool bf16) {
  DevicePeak p;
#if PTK_TORCH_CUDA
  if (device < 0 || !torch::cuda::is_available() || device >= static_cast<int>(torch::cuda::device_count())) {
    p.source = "unknown: no CUDA device " + std::to_string(device);
    return p;
  }
  const std::string name = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device))->name;
  const char* dtype = bf16 ? "bf16" : "fp32";
  if ((p.flops = known_gpu_peak_flops(name, bf16)) > 0) {
    p.source = name + ": " + dtype + " dense peak (table)";
    return p;
  }
  p.flops = measure_cuda_gemm_flops(device, bf16);
  p.source = name + ": " + dtype + " 8192^3 GEMM measured at start (not in the table)";
#else
  (void)device, (void)bf16;
  p.source = "unknown: this build has no CUDA";
#endif
  return p;
}

}  // namespace ptk::train
