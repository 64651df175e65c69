#include "core/runtime/device.h"

#include <torch/cuda.h>

#include <cstdlib>

#include "core/util/error.h"

namespace ptk::runtime {
namespace {

int gpu_count() { return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0; }

// A non-negative integer variable, or -1 when unset.
int env_index(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0 || x > 1 << 30)
    throw Error(std::string("distributed run: ") + name + "=" + v + " is not a non-negative integer");
  return static_cast<int>(x);
}

}  // namespace

int env_local_rank() {
  const int local = env_index("LOCAL_RANK");
  if (local >= 0) return local;
  const int rank = env_index("RANK");
  return rank >= 0 ? rank : 0;
}

at::Device resolve_device(const std::string& spec, const std::string& key, bool allow_meta) {
  // The GPU count only where the spelling can need it: cpu and meta never touch the CUDA runtime.
  const bool needs_gpus = valid_device_spec(spec) && spec != "cpu" && spec != "meta";
  return resolve_device_for(spec, needs_gpus ? gpu_count() : 0, key, allow_meta);
}

at::Device resolve_device_for(const std::string& spec, int gpus, const std::string& key, bool allow_meta) {
  if (!valid_device_spec(spec))
    throw Error(key + " = `" + spec + "` is not a device\n---> HINT: auto | cpu | cuda | cuda:N (a GPU index)");
  if (spec == "cpu") return at::Device(at::kCPU);
  if (spec == "meta") {
    if (allow_meta) return at::Device(at::kMeta);
    throw Error(key + " = meta places tensors without data: it is for tests, a command computes nothing there"
                      "\n---> HINT: auto | cpu | cuda | cuda:N");
  }
  const int n = gpus;
  if (spec == "auto" && n == 0) return at::Device(at::kCPU);
  if (n == 0)
    throw Error(key + " = " + spec + " but " +
#if PTK_TORCH_CUDA
                std::string("this machine has no CUDA GPU that LibTorch can use (torch::cuda::is_available() is false: "
                            "no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every GPU)") +
#else
                std::string("this build of ptk has no CUDA (configured with PTK_CUDA=OFF, or a CPU-only torch wheel)") +
#endif
                "\n---> HINT: " + key + "=cpu, or auto (a GPU when there is one, else the CPU)");
  const bool by_rank = spec == "auto" || spec == "cuda";
  const int index = by_rank ? env_local_rank() : std::atoi(spec.c_str() + 5);
  if (index >= n)
    throw Error(key + " = " + spec + (by_rank ? " (local rank " + std::to_string(index) + ")" : std::string()) +
                " but this machine has " + std::to_string(n) + " CUDA GPU" + (n == 1 ? "" : "s") + " (cuda:0" +
                (n > 1 ? "..cuda:" + std::to_string(n - 1) : std::string()) + ")\n---> HINT: pick one of them, or auto");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
}

std::string device_name(const at::Device& device) {
  if (device.is_cpu()) return "cpu";
  if (device.is_meta()) return "meta";
  if (device.is_cuda()) return "cuda:" + std::to_string(device.has_index() ? device.index() : 0);
  return device.str();
}

}  // namespace ptk::runtime
