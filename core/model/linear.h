// A decoder layer's seven linears (q, k, v, o, gate, up, down) as the one layer body calls them:
// the model's weight and bias, optionally a packed copy for decode steps (PackedDecodeWeights) and
// an adapter that wraps the linear (LoRA: core/model/lora.h) without touching the model's code.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

namespace ptk::kernels::cpu {
class PackedLinear;
}

namespace ptk::model {

enum class LinearId { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
constexpr size_t kLayerLinears = 7;
// HF name inside a layer: "self_attn.q_proj", ..., "mlp.down_proj".
const char* linear_name(LinearId id);

// Wraps one linear: gets the input x (..., in) and the base output x W^T + b (..., out) and returns
// the linear's output. Its parameters are its own (not in Qwen2Model::named_parameters()).
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  virtual at::Tensor forward(const at::Tensor& x, const at::Tensor& base_out) const = 0;
  // Its tensors, in a fixed order, and the same adapter over other tensors of those shapes:
  // activation checkpointing passes them through its autograd Function and rebuilds the adapter on
  // fresh leaves in backward, so gradients reach them. Default: none (then it trains nothing there).
  virtual std::vector<at::Tensor> parameters() const { return {}; }
  virtual std::shared_ptr<const LinearAdapter> with_parameters(const std::vector<at::Tensor>& p) const { return nullptr; }
  // Whether forward draws random numbers (dropout): activation checkpointing then replays the
  // generator's state so the recomputation draws the same.
  virtual bool stochastic() const { return false; }
};
using LayerAdapters = std::array<std::shared_ptr<const LinearAdapter>, kLayerLinears>;

// Whether adapters run in training mode (dropout). Qwen2Model::forward sets it to the grad mode it
// is called in, for the whole forward, so a checkpointed layer (whose forward runs without grad) and
// its recomputation in backward agree; the cached forward runs with it off. Off outside a forward.
bool adapters_training();
class AdaptersTrainingScope {
 public:
  explicit AdaptersTrainingScope(bool on);
  ~AdaptersTrainingScope();
  AdaptersTrainingScope(const AdaptersTrainingScope&) = delete;
  AdaptersTrainingScope& operator=(const AdaptersTrainingScope&) = delete;

 private:
  bool previous_;
};

// One linear as the body sees it.
struct Linear {
  const at::Tensor* weight = nullptr;  // (out, in)
  const at::Tensor* bias = nullptr;    // (out) or null
  const kernels::cpu::PackedLinear* packed = nullptr;  // decode steps: x (R, 1, in) through the packed copy
  const LinearAdapter* adapter = nullptr;
  at::Tensor operator()(const at::Tensor& x) const;
};

}  // namespace ptk::model
