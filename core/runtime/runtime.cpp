#include "core/runtime/runtime.h"

#include "core/runtime/cpu_allocator.h"

#include <dlfcn.h>
#include <link.h>
#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>

#include <ATen/Parallel.h>
#include <torch/torch.h>
#include <torch/version.h>

namespace ptk::runtime {
namespace {

int cores_available() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

int loaded_lib_cb(struct dl_phdr_info* info, size_t, void* data) {
  auto* out = static_cast<std::string*>(data);
  if (info->dlpi_name && std::strstr(info->dlpi_name, "blas")) {
    if (!out->empty()) *out += ",";
    *out += info->dlpi_name;
  }
  return 0;
}

std::string detect_blas(bool* slow) {
  // OpenBLAS exports openblas_get_config; MKL exports mkl_get_version_string.
  using GetConfig = char* (*)();
  if (auto f = reinterpret_cast<GetConfig>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
    *slow = false;
    std::string cfg = f();
    return "OpenBLAS (" + cfg + ")";
  }
  if (dlsym(RTLD_DEFAULT, "mkl_get_version_string")) {
    *slow = false;
    return "MKL";
  }
  std::string libs;
  dl_iterate_phdr(loaded_lib_cb, &libs);
  if (libs.find("blis") != std::string::npos) {
    *slow = false;
    return "BLIS (" + libs + ")";
  }
  if (libs.empty()) {
    // CUDA builds of pip torch link MKL statically; no BLAS shared object means nothing to warn about.
    *slow = false;
    return "built-in";
  }
  *slow = true;
  return "reference BLAS (" + libs + ")";
}

size_t read_status_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  size_t klen = std::strlen(key);
  while (std::getline(in, line)) {
    if (line.compare(0, klen, key) == 0) return std::strtoull(line.c_str() + klen + 1, nullptr, 10);
  }
  return 0;
}

bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env && std::strcmp(env, value) == 0;
}

// glibc hands every freed block over 32 MiB (its largest mmap threshold) back to the kernel and
// trims the heap's top, so a training step's activations, attention scores and logit chunks are
// page-faulted in afresh every step: at the 0.5B shape, sequence 1024, 2.08 M minor faults and
// 8.5 s of kernel CPU a step, 25.5 s -> 20.4 s a step with the memory kept (train_step_bench,
// 2026-11-28). Kept memory is reused by the next allocation; RSS stays at its peak between steps
// and the peak itself moved little (0.5B slow tests: SFT step at 4096 10.62 -> 10.30-10.70 GB).
// Since then tensors of 2 MiB and more bypass malloc (cpu_allocator.h keeps them); glibc keeps the
// smaller ones. PTK_KEEP_FREED_MEMORY=0 leaves glibc's defaults and unmaps large blocks on free
// (init then does not call this).
bool keep_freed_in_malloc() {
#ifdef __GLIBC__
  // No mmap for large blocks (the heap serves them; other threads' arenas fall back to it), and
  // no trimming of the heap's top (-1: never, per mallopt(3)).
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
#else
  return false;
#endif
}

}  // namespace

Info init(int requested) {
  Info info;
  info.ptk_version = PTK_VERSION;
  info.torch_version = TORCH_VERSION;
  int threads = 0;
  if (requested > 0) {
    threads = requested;
    info.threads_from = "flag";
  } else if (const char* env = std::getenv("OMP_NUM_THREADS"); env && std::atoi(env) > 0) {
    threads = std::atoi(env);
    info.threads_from = "OMP_NUM_THREADS";
  } else {
    threads = cores_available();
    info.threads_from = "cores";
  }
  at::set_num_threads(threads);
  const bool keep = !env_is("PTK_KEEP_FREED_MEMORY", "0");
  info.keeps_freed_memory = keep && keep_freed_in_malloc();
  if (!env_is("PTK_CPU_ALLOCATOR", "malloc")) {
    CpuAllocatorOptions o;
    o.keep_freed = keep;
    o.huge_pages = !env_is("PTK_HUGE_PAGES", "0");
    info.cpu_allocator = install_cpu_allocator(o);
    info.huge_pages = info.cpu_allocator && o.huge_pages;
  }
  info.threads = at::get_num_threads();
  info.device = torch::cuda::is_available() ? "cuda (" + std::to_string(torch::cuda::device_count()) + " GPUs)" : "cpu";
  info.blas = detect_blas(&info.slow_blas);
  return info;
}

std::string banner(const Info& i) {
  return "ptk " + i.ptk_version + " | LibTorch " + i.torch_version + " | " + i.device + " | " +
         std::to_string(i.threads) + " threads (" + i.threads_from + ") | BLAS " + i.blas +
         " | OMP_WAIT_POLICY " + (std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "unset") +
         (i.keeps_freed_memory ? " | freed memory kept" : "") +
         (i.cpu_allocator ? (i.huge_pages ? " | large tensors on huge pages" : " | large tensors mapped") : "");
}

Info init_and_announce(int requested) {
  Info i = init(requested);
  std::cerr << banner(i) << "\n";
  if (i.slow_blas) {
    std::cerr << "\n!!! WARNING: LibTorch is using the reference BLAS, about 80x slower than OpenBLAS here.\n"
                 "!!! ---> HINT: apt-get install libopenblas0-openmp (scripts/setup.sh does), or\n"
                 "!!!      update-alternatives --config libblas.so.3-x86_64-linux-gnu\n\n";
  }
  return i;
}

void release_freed_memory() {
  release_cached_cpu_blocks();
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

void reset_peak_rss() {
  release_freed_memory();
  std::ofstream("/proc/self/clear_refs") << "5";
}

size_t peak_rss_bytes() { return read_status_kb("VmHWM:") * 1024; }
size_t current_rss_bytes() { return read_status_kb("VmRSS:") * 1024; }

}  // namespace ptk::runtime
