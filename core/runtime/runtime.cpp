#include "core/runtime/runtime.h"

#include <dlfcn.h>
#include <link.h>
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
  info.threads = at::get_num_threads();
  info.device = torch::cuda::is_available() ? "cuda (" + std::to_string(torch::cuda::device_count()) + " GPUs)" : "cpu";
  info.blas = detect_blas(&info.slow_blas);
  return info;
}

std::string banner(const Info& i) {
  return "ptk " + i.ptk_version + " | LibTorch " + i.torch_version + " | " + i.device + " | " +
         std::to_string(i.threads) + " threads (" + i.threads_from + ") | BLAS " + i.blas +
         " | OMP_WAIT_POLICY " + (std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "unset");
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

size_t peak_rss_bytes() { return read_status_kb("VmHWM:") * 1024; }
size_t current_rss_bytes() { return read_status_kb("VmRSS:") * 1024; }

}  // namespace ptk::runtime
