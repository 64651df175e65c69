// The peak FLOP/s MFU is computed against when the parameters are on a CUDA device: the table of
// known_gpu_peak_flops (peak_flops.h) by the device's name, else a synced GEMM timed on the device.
// Answers "unknown" (flops 0: no MFU) on builds and machines without CUDA. Not the CPU's peak
// (peak_flops.h: this_cpu_peak_flops). Threading: the calling thread's current CUDA stream.
#pragma once
#include <string>

namespace ptk::train {

struct DevicePeak {
  double flops = 0;     // 0 = unknown
  std::string source;   // "NVIDIA H100 80GB HBM3: bf16 dense peak (table)", "... measured: ...", "unknown: ..."
};

// For CUDA device `device` and the parameters' dtype (bf16 or fp32).
DevicePeak cuda_peak_flops(int device, bool bf16);

// The best of `reps` synced n^3 GEMMs (bf16 or fp32) on CUDA device `device`, in FLOP/s after one
// warm-up; 0 without such a device. n = 8192 takes about 1 ms a product in bf16 on an H100.
double measure_cuda_gemm_flops(int device, bool bf16, int n = 8192, int reps = 5);

}  // namespace ptk::train
