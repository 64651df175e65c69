// AdamW equal to torch.optim.AdamW (decoupled weight decay, bias-corrected moments), with fp32
// master weights and moments whatever the parameters' dtype (bf16 mixed precision). Three paths,
// chosen by the parameters' device (adamw_path_for): a fused one-pass CPU kernel for fp32 CPU
// memory, ATen's fused multi-tensor kernel (at::_fused_adamw_, what torch.optim.AdamW(fused=True)
// runs) for CUDA, and the unfused reference tensor ops for anything else (meta) and for tests.
// Not a scheduler (schedule.h) nor a gradient clipper (clip.h).
// Threading: one owner thread; step() parallelises internally.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ptk::optim {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  // TRL/HF Trainer exclude biases and norm weights from decay; torch's default decays everything.
  bool decay_norms_and_biases = false;
};

// True for names HF Trainer keeps out of weight decay: biases and (RMS/Layer)Norm weights.
bool is_no_decay(const std::string& name);

// A gradient as a dense tensor. A tied embedding's gradient is sparse (the rows a batch used) when
// no lm_head loss densified it (Qwen2Model::forward); AdamW, GradSync and ZeRO-1 read it through this.
at::Tensor dense_grad(const at::Tensor& g);

// How step() updates the weights.
enum class AdamWPath {
  kCpuFused,    // one pass over fp32 contiguous CPU memory (adamw.cpp); others fall back to kReference
  kMultiTensor, // at::_fused_adamw_ per weight-decay group on the fp32 weights (masters for bf16
                // parameters, then one _foreach_copy_ back into them); no host read of any tensor
  kReference,   // unfused tensor ops, one parameter at a time (torch's single-tensor path)
};
// The path for parameters on `device`: cpu -> kCpuFused, cuda -> kMultiTensor, else (meta, ...)
// kReference.
AdamWPath adamw_path_for(const at::Device& device);
const char* adamw_path_name(AdamWPath path);  // "cpu_fused", "multi_tensor", "reference"

class AdamW {
 public:
  // `params` are the model's parameters (leaf tensors with requires_grad); they are updated in place.
  AdamW(NamedTensors params, AdamWOptions opt);

  // One update with learning rate `lr`, reading each parameter's .grad(); a parameter without a
  // gradient is skipped (as torch does).
  void step(double lr);
  void zero_grad();

  int64_t steps() const { return step_; }
  const AdamWOptions& options() const { return opt_; }
  const NamedTensors& params() const { return params_; }

  // State for checkpoints: "exp_avg.<name>", "exp_avg_sq.<name>" and, for non-fp32 parameters,
  // "master.<name>" (fp32), plus the step count. load_state() refuses missing or mis-shaped entries.
  NamedTensors state() const;
  void load_state(const NamedTensors& tensors, int64_t step);

  // The reference path (unfused tensor ops) when false; for tests of the fused kernels. true: the
  // device's path again (adamw_path_for).
  void set_fused(bool fused);
  // Any path on any device (tests run kMultiTensor on the CPU: ATen has a CPU kernel of it too).
  void set_path(AdamWPath path) { path_ = path; }
  AdamWPath path() const { return path_; }
  // kMultiTensor with bf16 gradients: the fp32 copies of the gradients one _fused_adamw_ call takes
  // at most (default 512 MiB; a tensor larger than this gets a call of its own).
  void set_cast_chunk_bytes(double bytes) { cast_chunk_bytes_ = bytes; }

 private:
  struct Slot {
    at::Tensor exp_avg, exp_avg_sq, master;  // fp32; master undefined when the param is fp32
    double weight_decay;
  };
  NamedTensors params_;
  std::vector<Slot> slots_;
  AdamWOptions opt_;
  int64_t step_ = 0;
  AdamWPath path_ = AdamWPath::kCpuFused;
  at::Tensor step_tensor_;  // kMultiTensor: the step count as a float32 scalar on the weights' device
  double cast_chunk_bytes_ = 512.0 * (1 << 20);

  void step_multi_tensor(double lr);
};

}  // namespace ptk::optim
