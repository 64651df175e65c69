// Free memory of a CUDA device, for checks that run before anything is placed on it (the training
// stages' memory estimate). Compiles and answers "no" on builds and machines without CUDA.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ptk::runtime {

// Free and total bytes of CUDA device `device` (cudaMemGetInfo), counting as free what LibTorch's
// caching allocator holds reserved but unused. False when this build or machine has no such device.
bool cuda_free_memory(int device, size_t* free_bytes, size_t* total_bytes);

// The CUDA device index a device spelling (run.device: auto | cpu | cuda | cuda:N | meta) resolves
// to, -1 for the CPU or meta; throws resolve_device's ptk::Error (naming `key`) for a GPU that is not
// there. Torch-free, for the memory estimate.
int cuda_index_of(const std::string& spec, const std::string& key = "run.device");

// LibTorch's CUDA caching allocator on one device, in bytes: what tensors hold now (allocated), what
// the allocator holds from the driver now (reserved), and the highest of each since the last reset.
struct CudaMemoryStats {
  double allocated = 0, reserved = 0, peak_allocated = 0, peak_reserved = 0;
};
// The stats of CUDA device `device`; with `reset_peak` the peaks start again from the current values
// (so the next call's peaks cover the time between the two calls). Reads host-side counters: no
// synchronisation with the device. False (and *out untouched) on builds and machines without it.
bool cuda_memory_stats(int device, CudaMemoryStats* out, bool reset_peak);

// A CPU tensor of exactly `bytes` bytes (uint8, page-aligned) whose pages are locked for
// asynchronous copies to CUDA devices (cudaHostRegister) when this build and machine have CUDA and
// the registration succeeds (*pinned says whether it did); unregistered and freed with the tensor.
// Unlike LibTorch's pinned allocator, which rounds every block up to a power of two (a 1.09 GB
// embedding would take 2 GiB), it costs the bytes asked for.
at::Tensor pinned_host_bytes(int64_t bytes, bool* pinned = nullptr);

}  // namespace ptk::runtime
