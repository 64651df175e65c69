// Where a command runs its model: the `run.device` recipe key and the `--device` flag of commands
// without a recipe. One parser, so every command accepts the same spellings and refuses the same
// way. Not placement itself: each command moves its model and batches to the device this returns.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "core/runtime/device_spec.h"  // valid_device_spec

namespace ptk::runtime {

// The device for `spec`: auto = cuda:LOCAL_RANK when this build has CUDA and a GPU is there, else
// cpu; cuda = cuda:LOCAL_RANK; cuda:N as given. The local rank is LOCAL_RANK, else RANK, else 0 (as
// parallel::Comm reads it, so a rank's model and its process group share a GPU). Throws a ptk::Error
// naming `key` (e.g. "run.device") when the spelling is wrong, when CUDA is asked for on a build or
// machine without a GPU, when N (or the local rank) is not a GPU of this machine, and for `meta`
// unless `allow_meta` (tests build stages on meta; a command computes nothing there).
at::Device resolve_device(const std::string& spec, const std::string& key = "run.device", bool allow_meta = false);
// resolve_device on a machine with `gpus` CUDA GPUs (resolve_device passes this machine's count): the
// choice itself, including cuda:LOCAL_RANK under `ptk launch` and torchrun, testable without a GPU.
at::Device resolve_device_for(const std::string& spec, int gpus, const std::string& key = "run.device",
                              bool allow_meta = false);

// This process's local rank: LOCAL_RANK, else RANK, else 0 — the GPU a rank takes (parallel::Comm
// reads it here too). Throws a ptk::Error naming the variable when its value is not a non-negative
// integer.
int env_local_rank();

// "cpu", "cuda:0", "meta": the device as the recipe spells it (for logs and config.json).
std::string device_name(const at::Device& device);

}  // namespace ptk::runtime
