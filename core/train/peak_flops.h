// The peak FLOP/s MFU is computed against on a CPU: the theoretical peak of the cores this process
// computes on (threads x clock x FLOPs per cycle of the widest vector FMA the CPU has), read once
// from /proc/cpuinfo. A theoretical peak is an upper bound of what the cores can do, so
// mfu = model FLOPs / s / peak stays at or below 100% however loaded the machine is; a measured
// peak (a matmul timed at start, what ptk used before 2026-12-07) is low whenever other processes
// share the cores during the measurement, and MFU then read above 100% (1.33 in issue #26).
// No LibTorch; pure functions: safe from any thread.
#pragma once
#include <string>

namespace ptk::train {

struct CpuPeak {
  double flops = 0;           // FLOP/s of `threads` cores; 0 = unknown (no clock or ISA found)
  double ghz = 0;             // the highest clock found (cpuinfo_max_freq, "@ x.xxGHz", "cpu MHz")
  double flops_per_cycle = 0; // per core: 64 AVX-512, 32 AVX2+FMA / aarch64, 16 AVX, 8 SSE2 (fp32);
                              // bf16: 1024 with AMX, 128 with AVX512_BF16
  std::string isa;            // "avx512", "avx2", "amx_bf16", ...
};

// From /proc/cpuinfo's text and, when given, cpufreq's cpuinfo_max_freq (kHz text).
CpuPeak cpu_peak_flops(const std::string& cpuinfo, const std::string& max_freq_khz, int threads, bool bf16);
// This machine's, read from /proc/cpuinfo and /sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq.
CpuPeak this_cpu_peak_flops(int threads, bool bf16);

// On a GPU, MFU is computed against the vendor's dense peak of the device, looked up by the name
// CUDA reports (cudaDeviceProp::name) — like the CPU's, an upper bound that does not move with the
// load — and, for a device not in the table, against a synced GEMM timed once at start
// (core/train/device_peak.h). Dense (no 2:4 sparsity) FLOP/s, SXM clocks where the name does not say:
//   H100 SXM / GH200   bf16 989.4 T   fp32 66.9 T      H100 PCIe  bf16 756.5 T  fp32 51.2 T
//   H100 NVL           bf16 835.5 T   fp32 60.0 T      H200 (SXM) bf16 989.4 T  fp32 66.9 T
//   H200 NVL           bf16 835.5 T   fp32 60.0 T      A100       bf16 312 T    fp32 19.5 T
// fp32: the FMA units' rate (LibTorch's default matmul precision is "highest": no TF32).
// 0 = not in the table.
double known_gpu_peak_flops(const std::string& device_name, bool bf16);

}  // namespace ptk::train
