// The random number generator states a checkpoint keeps (trainer_state/rng.safetensors, and
// rng-rank-R.safetensors on other ranks): "torch_cpu", LibTorch's default CPU generator, always, and
// "torch_cuda", the default generator of the CUDA device the parameters are on, when they are on one
// (dropout and sampling on the GPU draw from it). Not the data order (the stage's cursor).
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ptk::train {

// The states to save for a run whose parameters are on `device`.
std::vector<std::pair<std::string, at::Tensor>> rng_state(const at::Device& device);

// Restores what `saved` has for `device`: "torch_cpu" (required: throws ptk::Error naming `origin`
// without it) and, on CUDA, "torch_cuda". Returns a note for the log ("" when nothing to say): a
// checkpoint without "torch_cuda" (written on the CPU, or by ptk before 2026-12) resumed on CUDA
// keeps the CUDA generator as seeded; one with it resumed on the CPU ignores it.
std::string restore_rng_state(const std::map<std::string, at::Tensor>& saved, const at::Device& device,
                              const std::string& origin);

}  // namespace ptk::train
