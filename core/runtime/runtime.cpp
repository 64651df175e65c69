#include "core/runtime/runtime.h"

#include "core/runtime/cpu_allocator.h"
#include "core/util/strings.h"

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
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/torch.h>
#include <torch/version.h>
#if PTK_TORCH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

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

// Shared objects loaded into this process whose file name contains one of `needles`.
struct LoadedLibs {
  std::vector<std::string> needles;
  std::vector<std::string> found;
};
int loaded_lib_cb(struct dl_phdr_info* info, size_t, void* data) {
  auto* l = static_cast<LoadedLibs*>(data);
  if (!info->dlpi_name || !*info->dlpi_name) return 0;
  std::string name = info->dlpi_name;
  std::string base = name.substr(name.rfind('/') + 1);
  for (const auto& n : l->needles)
    if (base.find(n) != std::string::npos) l->found.push_back(name);
  return 0;
}
std::vector<std::string> loaded_libs(std::vector<std::string> needles) {
  LoadedLibs l{std::move(needles), {}};
  dl_iterate_phdr(loaded_lib_cb, &l);
  return l.found;
}

// "key=value" out of at::show_config()'s "Build settings: A=1, B=2, ..." line.
std::string build_setting(const std::string& config, const std::string& key) {
  size_t p = config.find(key + "=");
  if (p == std::string::npos) return "";
  p += key.size() + 1;
  size_t e = config.find_first_of(",\n", p);
  return config.substr(p, e == std::string::npos ? std::string::npos : e - p);
}

// LibTorch's BLAS: the wheel links MKL statically (no shared object to see), so ask LibTorch.
std::string detect_blas(const std::string& config) {
  std::string blas = build_setting(config, "BLAS_INFO");
  if (blas == "mkl") {
    std::string v = at::get_mkl_version();  // "Intel(R) oneAPI Math Kernel Library Version 2024.2-Product Build ..."
    size_t p = v.find("Version ");
    std::string num = p == std::string::npos ? "" : v.substr(p + 8, v.find_first_of(" -", p + 8) - (p + 8));
    return "MKL" + (num.empty() ? "" : " " + num) + " (linked into LibTorch)";
  }
  return blas.empty() ? "unknown" : blas;
}

// The OpenMP runtimes actually loaded: one is right (LibTorch's bundled libgomp); two would mean
// two thread pools fighting over the cores.
std::string detect_openmp() {
  auto libs = loaded_libs({"libgomp", "libiomp", "libomp"});
  std::string runtimes = libs.empty() ? "none loaded" : join(libs, ", ");
  if (libs.size() > 1) runtimes += " — WARNING: more than one OpenMP runtime";
  return at::get_openmp_version() + " (" + runtimes + ")";
}

std::string cuda_version(long v) {  // 13000 -> "13.0"
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}
std::string cudnn_version(long v) {  // 91900 -> "9.19.0" (cuDNN 9 numbering)
  return std::to_string(v / 10000) + "." + std::to_string(v % 10000 / 100) + "." + std::to_string(v % 100);
}

// NCCL as loaded (libtorch_cuda links libnccl.so.2); "" when it is not in the process.
std::string detect_nccl() {
  using GetVersion = int (*)(int*);
  auto f = reinterpret_cast<GetVersion>(dlsym(RTLD_DEFAULT, "ncclGetVersion"));
  int code = 0;
  if (!f || f(&code) != 0 || code <= 0) return "";
  return std::to_string(code / 10000) + "." + std::to_string(code % 10000 / 100) + "." + std::to_string(code % 100);
}

void detect_cuda(Info& info) {
  info.cuda_compiled = PTK_TORCH_CUDA != 0;
  if (!info.cuda_compiled) return;
  const auto& hooks = at::detail::getCUDAHooks();
  try {
    info.cuda_runtime = cuda_version(hooks.versionCUDART());
  } catch (const std::exception&) {
  }
  try {
    if (hooks.hasCuDNN() || hooks.versionCuDNN() > 0) info.cudnn = cudnn_version(hooks.versionCuDNN());
  } catch (const std::exception&) {
  }
  info.nccl = detect_nccl();
  info.cuda_available = torch::cuda::is_available();
  info.cuda_devices = info.cuda_available ? static_cast<int>(torch::cuda::device_count()) : 0;
}

std::string device_name(const Info& info) {
  if (!info.cuda_available) return "cpu";
  std::string d = "cuda (" + std::to_string(info.cuda_devices) + (info.cuda_devices == 1 ? " GPU" : " GPUs");
#if PTK_TORCH_CUDA
  if (const auto* p = at::cuda::getDeviceProperties(0)) d += std::string(": ") + p->name;
#endif
  return d + ")";
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
  detect_cuda(info);
  info.device = device_name(info);
  const std::string config = at::show_config();
  info.blas = detect_blas(config);
  info.openmp = detect_openmp();
  return info;
}

std::string cuda_summary(const Info& i) {
  if (!i.cuda_compiled) return "CPU-only build";
  return "CUDA " + (i.cuda_runtime.empty() ? std::string("?") : i.cuda_runtime) + " compiled in, " +
         (i.cuda_available ? std::to_string(i.cuda_devices) + (i.cuda_devices == 1 ? " GPU" : " GPUs") + " usable"
                           : std::string("no GPU usable here"));
}

std::string banner(const Info& i) {
  return "ptk " + i.ptk_version + " | LibTorch " + i.torch_version + " (" + cuda_summary(i) + ") | " + i.device +
         " | " + std::to_string(i.threads) + " threads (" + i.threads_from + ") | BLAS " + i.blas +
         " | OMP_WAIT_POLICY " + (std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "unset") +
         (i.keeps_freed_memory ? " | freed memory kept" : "") +
         (i.cpu_allocator ? (i.huge_pages ? " | large tensors on huge pages" : " | large tensors mapped") : "");
}

Info init_and_announce(int requested) {
  Info i = init(requested);
  std::cerr << banner(i) << "\n";
  return i;
}

std::string describe(const Info& i) {
  auto or_none = [](const std::string& s) { return s.empty() ? std::string("none") : s; };
  std::string out;
  auto line = [&out](const char* k, const std::string& v) { out += std::string(k) + ": " + v + "\n"; };
  line("ptk", i.ptk_version);
  auto lib = loaded_libs({"libtorch_cpu"});
  line("LibTorch", i.torch_version + (lib.empty() ? "" : " (" + lib.front() + ")"));
  line("CUDA compiled in", i.cuda_compiled ? "yes, CUDA runtime " + or_none(i.cuda_runtime) : std::string("no"));
  line("CUDA available", i.cuda_available ? "yes, " + i.device : std::string(i.cuda_compiled ? "no (no driver or no GPU here)" : "no"));
  line("cuDNN", i.cuda_compiled ? or_none(i.cudnn) : std::string("none (CPU-only build)"));
  line("NCCL", i.cuda_compiled ? or_none(i.nccl) : std::string("none (CPU-only build)"));
  line("BLAS", i.blas);
  line("OpenMP", i.openmp);
  line("threads", std::to_string(i.threads) + " (from " + i.threads_from + ")");
  line("device", i.device);
  return out;
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
