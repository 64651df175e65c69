// Free memory of a CUDA device, for checks that run before anything is placed on it (the training
// stages' memory estimate). Compiles and answers "no" on builds and machines without CUDA.
#pragma once
#include <cstddef>

namespace ptk::runtime {

// Free and total bytes of CUDA device `device` (cudaMemGetInfo), counting as free what LibTorch's
// caching allocator holds reserved but unused. False when this build or machine has no such device.
bool cuda_free_memory(int device, size_t* free_bytes, size_t* total_bytes);

}  // namespace ptk::runtime
