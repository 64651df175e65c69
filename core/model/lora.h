// LoRA (Hu et al. 2021) on Qwen2Model's linears, in PEFT's layout: y = x W^T + b + s · dropout(x) A^T B^T
// with A (r, in), B (out, r) and s = alpha / r (alpha / sqrt(r) with rsLoRA). The base weights are
// untouched (frozen by the caller); the adapters ride on the model through Qwen2Model::set_adapter,
// so the training forward, the cached forward (rollouts) and activation checkpointing all see them.
// Files are PEFT's (adapter_config.json, adapter_model.safetensors with PEFT's tensor names:
// base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...), so PEFT and ptk load each
// other's adapters. Not QLoRA, not DoRA.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint/adapter_config.h"  // AdapterConfig
#include "core/checkpoint/checkpoint.h"      // NamedTensors, SaveOptions
#include "core/model/linear.h"               // LinearAdapter, LinearId
#include "core/model/qwen2.h"                // Qwen2Model, LoadOptions

namespace ptk::model {

// One linear's adapter. A and B are the trained tensors (shared with the optimizer: updated in
// place). Dropout applies to the adapter's input only, and only in a training forward
// (model::adapters_training(): a forward called with grad mode on).
class LoraLinear : public LinearAdapter {
 public:
  LoraLinear(at::Tensor a, at::Tensor b, double scaling, double dropout);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& base_out) const override;
  std::vector<at::Tensor> parameters() const override { return {a_, b_}; }
  std::shared_ptr<const LinearAdapter> with_parameters(const std::vector<at::Tensor>& p) const override;
  bool stochastic() const override { return dropout_ > 0; }
  // s · B A (out, in) in float32: what merging adds to the weight.
  at::Tensor delta() const;
  const at::Tensor& a() const { return a_; }
  const at::Tensor& b() const { return b_; }
  double scaling() const { return scaling_; }

 private:
  at::Tensor a_, b_;
  double scaling_, dropout_;
};

// The LoRA options a stage trains with (recipe section model.lora, core/config/sections.h).
struct LoraOptions {
  int64_t rank = 16;
  double alpha = 32;
  double dropout = 0;
  // Short names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or "all-linear".
  std::vector<std::string> targets{"all-linear"};
  bool rslora = false;
  std::string init = "default";  // default: A Kaiming-uniform (U(±1/sqrt(in))), B zero | gaussian: A N(0, 1/r), B zero
  std::vector<std::string> modules_to_save;  // score | embed_tokens | lm_head (untied only)
  std::string task_type = "CAUSAL_LM";       // CAUSAL_LM | SEQ_CLS (a reward model)
};

// The linears "all-linear" means for Qwen2 (PEFT's expansion: every linear but the output layer).
const std::vector<std::string>& lora_linear_names();
// LoraOptions::targets as the short names it selects, in the model's order (all-linear expanded);
// throws on an unknown name or an empty list.
std::vector<std::string> lora_target_names(const std::vector<std::string>& targets);

class Lora {
 public:
  // New adapters on `model`'s targeted linears, in its dtype and on its device, drawn from `seed`
  // (A per options.init, B zero: the model's outputs are unchanged until B moves). modules_to_save
  // become trainable copies in `model`; the originals are kept for base_of(). Throws on unknown
  // targets or modules, or when `model` already has adapters.
  static Lora attach(Qwen2Model& model, const LoraOptions& options, uint64_t seed);
  // The adapter of PEFT folder `dir` on `model` (targets, rank and scaling from its
  // adapter_config.json); a missing, extra or mis-shaped tensor is refused by name. Its
  // modules_to_save replace `model`'s (a score head is added to a causal LM for SEQ_CLS adapters).
  // `adapter_dtype`: A and B in that dtype instead of the model's (float32 for a merge: PEFT keeps
  // adapters in fp32; such an adapter is for merging, not for the model's forward).
  static Lora load(Qwen2Model& model, const std::string& dir, std::optional<at::ScalarType> adapter_dtype = std::nullopt);

  const checkpoint::AdapterConfig& config() const { return config_; }
  // The trained tensors under PEFT's names: lora_A/lora_B of every adapted linear (layer order, then
  // q, k, v, o, gate, up, down), then the modules_to_save. Shared with the model: updated in place.
  checkpoint::NamedTensors named_parameters() const;
  int64_t numel() const;
  // Writes the adapter folder (atomically); config().base_model goes into base_model_name_or_path.
  void save(const std::string& dir, const checkpoint::SaveOptions& options) const;
  void set_base_model(const std::string& base) { config_.base_model = base; }

  // `model` with every adapter switched off and modules_to_save at their originals: a handle that
  // shares the base tensors (no copy), e.g. DPO's and GRPO's reference model.
  Qwen2Model base_of(const Qwen2Model& model) const;
  // `model` with the adapters merged: each adapted weight becomes W + s·B A (new tensors, computed in
  // float32, stored in W's dtype, on `where` or W's device); the other tensors are shared. No adapters.
  Qwen2Model merged(const Qwen2Model& model, std::optional<at::Device> where = std::nullopt) const;
  // The same on `model` itself: each adapted weight is replaced (the old one released at once, so a
  // model loaded for merging never holds two copies of its linears); its adapters are removed.
  void merge_into(Qwen2Model& model, std::optional<at::Device> where = std::nullopt) const;

 private:
  struct Entry {
    int64_t layer;
    LinearId id;
    std::shared_ptr<const LoraLinear> adapter;
  };
  checkpoint::AdapterConfig config_;
  std::vector<Entry> entries_;
  checkpoint::NamedTensors saved_;               // modules_to_save: PEFT name -> the trainable tensor
  std::map<std::string, at::Tensor> originals_;  // modules_to_save: module -> the tensor before training
};

// PEFT's module name of linear `id` in layer `layer`: "model.layers.3.self_attn.q_proj".
std::string lora_module_name(int64_t layer, LinearId id);

// A model from PEFT adapter folder `dir`: its base (base_model_name_or_path, possibly an adapter
// folder itself) loaded with `options` and the adapter merged in. Qwen2Model::from_pretrained calls
// this for adapter folders, so every command that takes a model folder takes an adapter folder.
Qwen2Model load_merged_adapter(const std::string& dir, const LoadOptions& options);

}  // namespace ptk::model
