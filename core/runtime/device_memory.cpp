#include "core/runtime/device_memory.h"

#include "core/runtime/device.h"
#include "core/util/error.h"

#include <cstdlib>

#include <torch/torch.h>
#if PTK_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace ptk::runtime {

bool cuda_free_memory(int device, size_t* free_bytes, size_t* total_bytes) {
#if PTK_TORCH_CUDA
  if (device < 0 || !torch::cuda::is_available() || device >= static_cast<int>(torch::cuda::device_count()))
    return false;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  size_t f = 0, t = 0;
  if (cudaMemGetInfo(&f, &t) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error for whoever calls CUDA next
    return false;
  }
  // Reserved by this process's caching allocator but not handed out: LibTorch reuses it first.
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const int64_t cached = stats.reserved_bytes[agg].current - stats.allocated_bytes[agg].current;
  *free_bytes = f + static_cast<size_t>(cached > 0 ? cached : 0);
  *total_bytes = t;
  return true;
#else
  (void)device, (void)free_bytes, (void)total_bytes;
  return false;
#endif
}

at::Tensor pinned_host_bytes(int64_t bytes, bool* pinned) {
  PTK_CHECK(bytes >= 0, "pinned_host_bytes: a negative size");
  const size_t n = static_cast<size_t>(std::max<int64_t>(bytes, 1));
  void* p = nullptr;
  if (posix_memalign(&p, 4096, n) != 0)
    throw Error("cannot allocate " + std::to_string(bytes) + " bytes of host memory");
  bool registered = false;
#if PTK_TORCH_CUDA
  if (torch::cuda::is_available()) {
    registered = cudaHostRegister(p, n, cudaHostRegisterDefault) == cudaSuccess;
    if (!registered) cudaGetLastError();  // e.g. over the locked-memory limit: pageable, still correct
  }
#endif
  if (pinned) *pinned = registered;
  auto release = [registered](void* q) {
#if PTK_TORCH_CUDA
    if (registered) cudaHostUnregister(q);
#else
    (void)registered;
#endif
    std::free(q);
  };
  return at::from_blob(p, {bytes}, release, at::TensorOptions().dtype(at::kByte));
}

int cuda_index_of(const std::string& spec, const std::string& key) {
  const at::Device d = resolve_device(spec.empty() ? "auto" : spec, key, /*allow_meta=*/true);
  return d.is_cuda() ? (d.has_index() ? d.index() : 0) : -1;
}

bool cuda_memory_stats(int device, CudaMemoryStats* out, bool reset_peak) {
#if PTK_TORCH_CUDA
  if (device < 0 || !torch::cuda::is_available() || device >= static_cast<int>(torch::cuda::device_count()))
    return false;
  const auto d = static_cast<c10::DeviceIndex>(device);
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d);
  const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  out->allocated = static_cast<double>(stats.allocated_bytes[agg].current);
  out->reserved = static_cast<double>(stats.reserved_bytes[agg].current);
  out->peak_allocated = static_cast<double>(stats.allocated_bytes[agg].peak);
  out->peak_reserved = static_cast<double>(stats.reserved_bytes[agg].peak);
  if (reset_peak) c10::cuda::CUDACachingAllocator::resetPeakStats(d);
  return true;
#else
  (void)device, (void)out, (void)reset_peak;
  return false;
#endif
}

}  // namespace ptk::runtime
