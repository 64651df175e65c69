#include "core/train/rng_state.h"

#include <ATen/Context.h>
#include <ATen/core/Generator.h>

#include <mutex>

#include "core/util/error.h"

namespace ptk::train {
namespace {

// A handle to the process-wide default generator of `device` (CPU, or CUDA device N through
// LibTorch's CUDA hooks: at::cuda::detail::getDefaultCUDAGenerator, with no CUDA header here, so the
// file compiles the same with and without PTK_CUDA).
at::Generator default_generator(const at::Device& device) {
  if (device.is_cpu()) return at::detail::getDefaultCPUGenerator();
  return at::globalContext().defaultGenerator(device);
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> rng_state(const at::Device& device) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  {
    at::Generator cpu = default_generator(at::Device(at::kCPU));
    std::lock_guard<std::mutex> lock(cpu.mutex());
    out.emplace_back("torch_cpu", cpu.get_state());
  }
  if (device.is_cuda()) {
    at::Generator cuda = default_generator(device);
    std::lock_guard<std::mutex> lock(cuda.mutex());
    out.emplace_back("torch_cuda", cuda.get_state());  // a CPU uint8 tensor (seed and offset)
  }
  return out;
}

std::string restore_rng_state(const std::map<std::string, at::Tensor>& saved, const at::Device& device,
                              const std::string& origin) {
  auto cpu_it = saved.find("torch_cpu");
  if (cpu_it == saved.end())
    throw Error(origin + " has no torch_cpu generator state\n---> HINT: the checkpoint is damaged; resume from an "
                "earlier one, or resume=never to start over");
  {
    at::Generator cpu = default_generator(at::Device(at::kCPU));
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(cpu_it->second.clone());
  }
  auto cuda_it = saved.find("torch_cuda");
  if (device.is_cuda()) {
    if (cuda_it == saved.end())
      return origin + " has no torch_cuda generator state (written on the CPU or by an older ptk): the CUDA "
             "generator keeps its seed, so GPU-side random draws differ from the original run";
    at::Generator cuda = default_generator(device);
    std::lock_guard<std::mutex> lock(cuda.mutex());
    cuda.set_state(cuda_it->second.clone());
    return "";
  }
  if (cuda_it != saved.end())
    return origin + " also holds a torch_cuda generator state (written on a GPU); this run is on " + device.str() +
           " and does not use it";
  return "";
}

}  // namespace ptk::train
