// The set-up every training stage shares, written once: where the run's models live (run.device),
// the policy with its tokenizer (load_policy), the prepared train/eval splits and their loader
// (open_splits), the MFU FLOPs estimate, saving the trained folder, and moving host batches to the
// device. The dtype per device is from_recipe.h's model_load_options. Not the step loop (trainer.h)
// nor any stage's data or loss.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config/sections.h"      // TrainingRecipe, ModelSection
#include "core/model/lora.h"           // Lora
#include "core/model/qwen2.h"          // Qwen2Model, LoadOptions
#include "core/optim/adamw.h"          // NamedTensors
#include "core/parallel/comm.h"        // Comm
#include "core/tokenizer/tokenizer.h"  // Tokenizer
#include "core/train/from_recipe.h"    // load_model, model_load_options
#include "datasets/loader.h"           // PreparedSet, Loader
#include "datasets/prepare.h"          // Format, PrepareOptions

namespace ptk::train {

// run.device resolved (runtime::resolve_device with the key "run.device"): auto = cuda:LOCAL_RANK when
// a GPU is there, else cpu. Throws a ptk::Error naming run.device when CUDA is asked for without one.
at::Device run_device(const config::TrainingRecipe& r);

// A stage's trained model and what belongs with it.
struct Policy {
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer;
  std::string tok_path;       // tokenizer.path, else model.path
  std::string tok_dir;        // the folder whose tokenizer files saved models get
  std::string chat_template;  // tokenizer.chat_template when it overrides the folder's ("" otherwise)
  int32_t pad_id = -1;        // the tokenizer's pad id, else its EOS id (-1: neither)
  model::Qwen2Model model;    // on `device`, in model.dtype, not yet trainable
  at::Device device = at::kCPU;
  // model.lora.enabled, after make_trainable: the adapters trained on `model` (whose base is frozen).
  std::shared_ptr<model::Lora> lora;
};

// The tokenizer (tokenizer.path, else model.path; chat-template overrides), its pad id, and the
// model (model.path or a random init from model.config and run.seed; `path_hint` says what
// model.path should be) on `device`, refused when the tokenizer has more ids than the model.
Policy load_policy(const config::TrainingRecipe& r, const at::Device& device, const std::string& path_hint);

// Makes the policy trainable. Without model.lora.enabled: every parameter. With it: the base frozen
// (no gradients: no optimizer state either) and LoRA adapters on model.lora.targets, fresh from
// run.seed or loaded from model.adapter (whose rank, alpha, targets and rslora must be the recipe's).
// `task_type` is PEFT's: CAUSAL_LM, or SEQ_CLS for a reward model (its score head is then trained
// and saved with the adapter, as PEFT does). The adapter's base_model_name_or_path is model.path as
// an absolute folder; a random-init base (model.config) is first written to run_dir/base (rank 0),
// so that the adapter always has a folder to go onto.
void make_trainable(Policy& p, const config::TrainingRecipe& r, const std::string& run_dir, parallel::Comm& comm,
                    const std::string& task_type);

// What the optimizer updates: the adapters (PEFT names) with LoRA, else the whole model (HF names).
optim::NamedTensors trainable_parameters(const Policy& p);
// Bytes of the frozen base with LoRA (Stage::frozen_bytes), else 0.
double frozen_bytes(const Policy& p);

// The policy's starting point for DPO's and GRPO's reference: with LoRA, the policy with its
// adapters switched off (a handle sharing the frozen base: no copy); without, an empty optional
// (the stage loads or copies its reference as before).
std::optional<model::Qwen2Model> adapters_off(const Policy& p);

// The prepared train split, the eval split (null without data.eval) and the train loader
// (train.micro_batch_size, run.seed; set_rank re-makes it per rank).
struct Splits {
  std::unique_ptr<data::PreparedSet> train, eval;
  std::unique_ptr<data::Loader> loader;
};

// Prepares data.train (and data.eval) into run_dir/prepared on rank 0 while the other ranks wait
// (the run folder must be on a filesystem every rank sees), then opens them on every rank.
// `adjust` edits both splits' PrepareOptions (e.g. RM's overlong=drop). `what` names the files
// data.train should hold in the error when it is empty.
Splits open_splits(const config::TrainingRecipe& r, const std::string& run_dir, data::Format format,
                   const std::string& tok_path, parallel::Comm& comm, const std::string& what,
                   const std::function<void(data::PrepareOptions&)>& adjust = {});

// The loader of `splits.train` for `rank` of `world_size` (Stage::set_rank).
void set_loader_rank(Splits& splits, int rank, int world_size);

// MFU's model FLOPs per trained token: 6N over the decoder's matmuls (not the embedding, a lookup,
// nor the output layer, which ptk projects for target tokens only) plus causal attention at
// `seq_len` (QK^T and AV forward+backward, half masked). `attn` (optional) gets the attention part.
// With LoRA (`lora`): the frozen base costs 4N (forward, and backward to the inputs only: no weight
// gradients) and the adapters 6 N_lora.
double decoder_flops_per_token(const model::Qwen2Model& m, int64_t seq_len, double* attn = nullptr,
                               int64_t* decoder_params = nullptr, const model::Lora* lora = nullptr);

// Writes `model` as a plain HF folder with the policy's tokenizer files and chat template; with
// LoRA (p.lora), the PEFT adapter folder instead (adapter_config.json, adapter_model.safetensors and
// the same tokenizer files).
void save_policy_model(const model::Qwen2Model& model, const Policy& p, const config::TrainingRecipe& r,
                       const std::string& dir);

// With LoRA and model.lora.save_merged: writes run_dir/final-merged, the base with the adapters
// merged (a plain HF folder). Nothing otherwise. Called on rank 0 after final/ is written.
void save_merged_final(const Policy& p, const config::TrainingRecipe& r, const std::string& run_dir);

// A host tensor on `device`: pinned and copied with non_blocking=true on CUDA (one copy per
// micro-batch, no synchronisation), a plain copy elsewhere (meta: shape only), itself when it is there.
at::Tensor to_device(const at::Tensor& host, const at::Device& device);

// Per row {first real token, real tokens} of right-padded rows of these lengths (ForwardInput::row_spans).
std::vector<std::pair<int64_t, int64_t>> right_padded_spans(const std::vector<int64_t>& lengths);

}  // namespace ptk::train
