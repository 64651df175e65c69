// `ptk info`: what this machine gives ptk — LibTorch version, CUDA compiled in and available,
// cuDNN, NCCL, BLAS, OpenMP runtime, threads — and a measured fp32 matmul rate, the peak MFU figures
// are computed against. Not a benchmark suite.
#include <chrono>
#include <cstdio>
#include <iostream>

#include <torch/torch.h>

#include "apps/ptk/cli.h"
#include "core/runtime/runtime.h"

namespace ptk::app {

int cmd_info(int argc, char** argv) {
  cli::CommandLine cl("info", "ptk info [--threads N] [--matmul-size N]",
                      "Prints what LibTorch was built with (CUDA, cuDNN, NCCL, BLAS, OpenMP), what this machine offers "
                      "(GPUs, threads) and measures fp32 matmul GFLOP/s on the CPU.");
  cl.flags().add_options()("matmul-size", boost::program_options::value<int>()->default_value(1024),
                           "side of the square fp32 matmul to time; 0 skips the measurement");
  if (!cl.parse(argc, argv)) return 0;
  auto info = runtime::init_and_announce(cl.threads());
  std::cout << runtime::describe(info);
  int n = cl.get<int>("matmul-size");
  if (n > 0) {
    torch::NoGradGuard ng;
    auto a = torch::randn({n, n});
    auto b = torch::randn({n, n});
    torch::mm(a, b);  // warm-up
    int iters = 0;
    auto t0 = std::chrono::steady_clock::now();
    double s = 0;
    while (s < 1.0 || iters < 3) {
      torch::mm(a, b);
      ++iters;
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    double gflops = 2.0 * n * n * n * iters / s / 1e9;
    std::printf("fp32 matmul %dx%d: %.1f GFLOP/s (%d iterations in %.2f s)\n", n, n, gflops, iters, s);
  }
  return 0;
}

}  // namespace ptk::app
