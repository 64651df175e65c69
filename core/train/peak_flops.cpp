#include "core/train/peak_flops.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <set>

namespace ptk::train {
namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string value_of(const std::string& line) {
  auto colon = line.find(':');
  if (colon == std::string::npos) return "";
  size_t b = line.find_first_not_of(" \t", colon + 1);
  return b == std::string::npos ? "" : line.substr(b);
}

}  // namespace

CpuPeak cpu_peak_flops(const std::string& cpuinfo, const std::string& max_freq_khz, int threads, bool bf16) {
  CpuPeak p;
  std::set<std::string> flags;
  bool aarch64 = false;
  double mhz = 0;
  std::istringstream in(cpuinfo);
  std::string line;
  while (std::getline(in, line)) {
    const std::string key = line.substr(0, line.find_first_of(":\t"));
    if ((key == "flags" || key == "Features") && flags.empty()) {
      std::istringstream f(value_of(line));
      std::string w;
      while (f >> w) flags.insert(w);
      if (key == "Features") aarch64 = true;
    } else if (key == "cpu MHz") {
      mhz = std::max(mhz, std::atof(value_of(line).c_str()));
    } else if (key == "model name") {
      auto at = line.find("@ ");
      if (at != std::string::npos) {
        double ghz = std::atof(line.c_str() + at + 2);
        if (line.find("GHz", at) != std::string::npos) mhz = std::max(mhz, ghz * 1000);
      }
    }
  }
  if (!max_freq_khz.empty()) mhz = std::max(mhz, std::atof(max_freq_khz.c_str()) / 1000);
  auto has = [&](const char* f) { return flags.count(f) > 0; };
  if (bf16 && has("amx_bf16")) {
    p.flops_per_cycle = 1024, p.isa = "amx_bf16";
  } else if (bf16 && has("avx512_bf16")) {
    p.flops_per_cycle = 128, p.isa = "avx512_bf16";
  } else if (has("avx512f")) {
    p.flops_per_cycle = 64, p.isa = "avx512";  // two 512-bit FMA units x 16 fp32 x 2
  } else if (has("avx2") && has("fma")) {
    p.flops_per_cycle = 32, p.isa = "avx2";
  } else if (has("avx")) {
    p.flops_per_cycle = 16, p.isa = "avx";
  } else if (has("sse2")) {
    p.flops_per_cycle = 8, p.isa = "sse2";
  } else if (aarch64) {
    p.flops_per_cycle = has("sve") ? 64 : 32, p.isa = has("sve") ? "sve" : "asimd";  // up to 4 128-bit FMA pipes
  }
  p.ghz = mhz / 1000;
  if (p.ghz > 0 && p.flops_per_cycle > 0 && threads > 0) p.flops = threads * p.ghz * 1e9 * p.flops_per_cycle;
  return p;
}

CpuPeak this_cpu_peak_flops(int threads, bool bf16) {
  return cpu_peak_flops(slurp("/proc/cpuinfo"), slurp("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"),
                        threads, bf16);
}

double known_gpu_peak_flops(const std::string& device_name, bool bf16) {
  auto has = [&](const char* s) { return device_name.find(s) != std::string::npos; };
  struct Row {
    double bf16, fp32;
  };
  Row r{0, 0};
  if (has("GH200")) r = {989.4e12, 66.9e12};
  else if (has("H200")) r = has("NVL") ? Row{835.5e12, 60.0e12} : Row{989.4e12, 66.9e12};
  else if (has("H100")) r = has("NVL") ? Row{835.5e12, 60.0e12} : has("PCIe") ? Row{756.5e12, 51.2e12} : Row{989.4e12, 66.9e12};
  else if (has("A100")) r = {312e12, 19.5e12};
  return bf16 ? r.bf16 : r.fp32;
}

}  // namespace ptk::train
