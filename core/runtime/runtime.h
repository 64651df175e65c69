// Process start-up: thread count, device, what LibTorch was built with, and the one banner line
// every command prints.
// Not a config loader: callers pass the thread request they resolved from flags and recipes.
#pragma once
#include <string>

namespace ptk::runtime {

struct Info {
  std::string ptk_version;
  std::string torch_version;  // "2.11.0"
  std::string device;         // "cpu" or "cuda (1 GPU: NVIDIA H100 80GB HBM3)"
  // CUDA: compiled into this ptk (the torch wheel has it and PTK_CUDA was on), and usable here (a
  // driver and at least one GPU). The versions are those LibTorch was built with; "" when absent.
  bool cuda_compiled = false;
  bool cuda_available = false;
  int cuda_devices = 0;
  std::string cuda_runtime;  // "13.0"
  std::string cudnn;         // "9.19.0"
  std::string nccl;          // "2.28.9" (the loaded libnccl)
  int threads = 1;
  std::string threads_from;  // "flag", "OMP_NUM_THREADS", "cores"
  std::string blas;          // "MKL 2024.2 (linked into LibTorch)" | another BLAS_INFO
  std::string openmp;        // "OpenMP 201511 (a.k.a. OpenMP 4.5) (.../torch/lib/libgomp.so.1)"
  // Freed memory is kept for reuse instead of returned to the kernel (runtime.cpp: 20% of a 0.5B
  // training step was page faults): glibc malloc for small blocks, ptk's CPU allocator for large
  // tensors. PTK_KEEP_FREED_MEMORY=0 turns it off.
  bool keeps_freed_memory = false;
  // LibTorch allocates CPU tensors of 2 MiB and more through runtime/cpu_allocator.h (on huge pages
  // unless PTK_HUGE_PAGES=0); PTK_CPU_ALLOCATOR=malloc keeps LibTorch's default allocator.
  bool cpu_allocator = false;
  bool huge_pages = false;
};

// Sets LibTorch's intra-op threads: `requested` > 0 wins, else OMP_NUM_THREADS, else every core
// this process may run on. Reads what LibTorch was built with and which GPUs are usable. Keeps
// freed memory in the process and installs the CPU allocator (see Info). Safe to call more than once.
Info init(int requested_threads);

// "ptk 0.1.0 | LibTorch 2.11.0 (CUDA 13.0 compiled in, no GPU here) | cpu | 2 threads (cores) | BLAS MKL ..."
std::string banner(const Info& info);

// init() + prints the banner to stderr.
Info init_and_announce(int requested_threads);

// Returns the memory this process has freed to the kernel (malloc_trim and the CPU allocator's
// cached blocks): for phase boundaries where what was freed will not be reused (after loading or
// building a model), since init() keeps freed memory otherwise.
void release_freed_memory();

// Starts a fresh peak for peak_rss_bytes(): release_freed_memory(), then resets VmHWM to the
// current RSS (/proc/self/clear_refs). For memory measurements of one phase.
void reset_peak_rss();

// Peak resident set size of this process, bytes (VmHWM).
size_t peak_rss_bytes();
size_t current_rss_bytes();

// `ptk info`'s table: every field of Info, one "name: value" line each.
std::string describe(const Info& info);

}  // namespace ptk::runtime
