#include "core/runtime/device.h"

#include <torch/cuda.h>

#include <cstdlib>

#include "core/util/error.h"

namespace ptk::runtime {
namespace {

int local_rank() {
  const char* env = std::getenv("LOCAL_RANK");
  if (!env || !*env) return 0;
  char* end = nullptr;
  long v = std::strtol(env, &end, 10);
  return (end && *end == '\0' && v >= 0) ? static_cast<int>(v) : 0;
}

int gpu_count() { return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0; }

}  // namespace

at::Device resolve_device(const std::string& spec, const std::string& key) {
  if (!valid_device_spec(spec))
    throw Error(key + " = `" + spec + "` is not a device\n---> HINT: auto | cpu | cuda | cuda:N (a GPU index) | meta");
  if (spec == "cpu") return at::Device(at::kCPU);
  if (spec == "meta") return at::Device(at::kMeta);
  const int n = gpu_count();
  if (spec == "auto") return n > 0 ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local_rank() % n)) : at::Device(at::kCPU);
  if (n == 0)
    throw Error(key + " = " + spec + " but " +
#if PTK_TORCH_CUDA
                std::string("this machine has no CUDA GPU that LibTorch can use (torch::cuda::is_available() is false: "
                            "no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every GPU)") +
#else
                std::string("this build of ptk has no CUDA (configured with PTK_CUDA=OFF, or a CPU-only torch wheel)") +
#endif
                "\n---> HINT: " + key + "=cpu, or auto (a GPU when there is one, else the CPU)");
  const int index = spec == "cuda" ? local_rank() : std::atoi(spec.c_str() + 5);
  if (index >= n)
    throw Error(key + " = " + spec + (spec == "cuda" ? " (LOCAL_RANK " + std::to_string(index) + ")" : std::string()) +
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
