// A training run's peak memory, estimated from the model's config.json and the recipe before
// anything is loaded or allocated, and compared with what this machine has, so that a recipe which
// cannot fit is refused with the key(s) responsible instead of meeting the OOM killer or
// std::bad_alloc hours in (issue 24: train.micro_batch_size=1e9 ran into the system's OOM killer at
// 24.3 GB). Torch-free arithmetic. Not the trainer's own check of the loaded weights
// (trainer.h: memory_budget_bytes) and not a measurement.
//
// Model (per rank, bytes; b = 4 for float32 and 2 for bfloat16, N = rows x sequence tokens):
//   resident  = weights P·b + gradients P·b (/ ranks with train.sharding=zero2) + AdamW moments 8P
//               (+ fp32 master 4P with bf16; / ranks with train.sharding=zero1 or zero2, or
//               train.zero1) + a live frozen reference P·b (dpo live, grpo beta != 0)
//               + 0.5 GiB for LibTorch, MKL and ptk themselves (CPU)
//               (grpo.reference_device=host on CUDA: the reference is not resident on the device; it is
//               a phase of its own, "reference log-prob pass": P·b + its forward without gradients)
//   with LoRA (model.lora.enabled): the frozen base P·b (no gradients, no AdamW state, no fp32
//               master) + the adapters' Pl parameters with gradients, moments and masters as above
//               (Pl = r·(in + out) per adapted linear and layer, plus modules_to_save, which are
//               trainable copies beside the base's originals); no live reference (DPO's and GRPO's
//               reference is the base with the adapters off)
//   peak      = resident + the largest phase of:
//     training step: activations + the lm_head op (sft, dpo, grpo) or score head (rm)
//       activations per decoder layer and token = b·(6H + 3Q + 2KV + 4I) (the tensors autograd keeps:
//       two RMSNorm outputs each side, rope'd q and k, v, attention output and its o_proj copy, the
//       residual, gate/up/silu/product of the MLP; Q = heads·head_dim, KV = kv_heads·head_dim,
//       I = intermediate), times L layers — or, with model.activation_checkpointing, L·N·H·b for
//       the kept layer inputs plus one layer; plus, where ptk's flash attention does not run
//       (no AVX-512, bf16, head size not a multiple of 16), the kept probabilities rows·heads·T²/2·4
//       (fp32 block path) or rows·heads·T²·(4+b) (the full square);
//       lm_head op: min(rows·V·4, 1 GiB) kept logits + two 256 MiB chunks + the (V, H) fp32 gradient
//       (not under LoRA, where the output layer is frozen, unless it is a module to save)
//     eval / reference pass (no grad): N·b·(3H + 3I) + one 256 MiB chunk
//     generation (grpo; held-out accuracy): KV cache slots·len·L·2·KV·b + the decode copies of the
//       lm_head (V·H·4) and of the layers (when they take <= 2 GiB), on AVX-512 fp32
//   Rows: sft micro_batch_size x max_seq_len; dpo and rm 2·micro_batch_size x max_seq_len (chosen and
//   rejected); grpo micro_batch_size x (max_seq_len + max_completion_length), its KV cache
//   rollout.slots x the same length.
// Checked against the 0.5B shape's measured peaks (README, BENCHMARKS.md): the estimate is above
// them by 10-19% (SFT step at 4096 checkpointed, DPO step, `ptk sft` at 1024).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/checkpoint/hf_config.h"  // Qwen2Config
#include "core/config/sections.h"       // TrainingRecipe

namespace ptk::train {

enum class StageKind { kSft, kDpo, kRm, kGrpo };
const char* stage_name(StageKind s);  // "sft", "dpo", "rm", "grpo"

// What one rank of a stage will hold, in the recipe's terms.
struct MemoryPlan {
  StageKind stage = StageKind::kSft;
  checkpoint::Qwen2Config model;  // the trained model's config.json
  std::string model_key;          // "model.path=runs/sft/final" (messages)
  bool bf16 = false;              // model.dtype=bfloat16
  bool cuda = false;              // placed on a CUDA device (compared with its free memory)
  int device = 0;                 // which CUDA device (run.device): available_memory(cuda, device)
  int64_t micro_batch_size = 1;   // rows (sft, grpo) or pairs (dpo, rm)
  int64_t max_seq_len = 2048;
  bool packing = true;            // sft: rows are always max_seq_len long; else up to it
  bool activation_checkpointing = false;
  bool flash_attention = true;    // ptk's fp32 flash kernel runs here (AVX-512, PTK_ATTENTION_FLASH unset)
  bool decode_packing = true;     // generation copies weights into the AVX-512 decode layout
  int64_t world_size = 1;
  bool zero1 = false;               // train.sharding=zero1 (or train.zero1): AdamW state / ranks
  bool zero2 = false;               // train.sharding=zero2: gradients and AdamW state / ranks
  int64_t eval_micro_batch_size = 0;  // <stage>.eval_micro_batch_size when data.eval is set; 0 = no eval pass
  int64_t heldout_new_tokens = 0;     // <stage>.eval_max_new_tokens when eval_prompts is set; 0 = none
  // dpo
  bool live_reference = false;        // a frozen reference beside the policy for the whole run (dpo, grpo)
  bool reference_on_host = false;     // grpo.reference_device=host: that reference sits in host memory and
                                      // is on a CUDA device only for its pass (no effect on the CPU)
  int64_t reference_pass_pairs = 0;   // dpo.precompute_ref_batch_size when the reference pass runs
  // grpo
  int64_t completion_len = 0;         // grpo.max_completion_length
  int64_t slots = 0;                  // rollout.slots
  // LoRA (model.lora.enabled): the base frozen, the adapters trained
  bool lora = false;
  int64_t lora_rank = 16;                                // model.lora.rank
  std::vector<std::string> lora_targets{"all-linear"};  // model.lora.targets
  std::vector<std::string> lora_modules_to_save;         // model.lora.modules_to_save (rm adds score)
};

// The trainable parameters of LoRA rank `rank` on `targets` (q_proj ... down_proj or all-linear) of
// every decoder layer of `model`, plus `modules_to_save` (score: num_labels x H, always for the rm
// stage; embed_tokens, lm_head: V x H). Unknown names count nothing (the stage refuses them).
double lora_parameter_count(const checkpoint::Qwen2Config& model, int64_t rank,
                            const std::vector<std::string>& targets,
                            const std::vector<std::string>& modules_to_save, StageKind stage);

struct MemoryTerm {
  std::string what;  // "activations"
  std::string keys;  // the recipe keys it grows with: "train.micro_batch_size=8 x data.max_seq_len=2048"
  double bytes = 0;
  std::string note{};  // context: "model.activation_checkpointing=false", "494M parameters, float32"
};

struct MemoryEstimate {
  double parameters = 0;             // of the trained model (the base's, with LoRA)
  double trainable_parameters = 0;   // = parameters, or the adapters' (and modules_to_save) with LoRA
  std::vector<MemoryTerm> resident;  // held through the run
  std::string phase;                 // the phase that peaks: "training step", "eval", "generation", ...
  std::vector<MemoryTerm> peak;      // that phase's own terms
  double total_bytes = 0;            // resident + peak
};

MemoryEstimate estimate_memory(const MemoryPlan& plan);

// Memory this rank may use. CPU: MemAvailable, or the cgroup's room (its memory.max / v1 limit minus
// what it holds beyond page cache) when lower, divided among the ranks on this machine
// (LOCAL_WORLD_SIZE). CUDA: the device's free memory (plus what LibTorch's cache holds unused).
struct AvailableMemory {
  double bytes = -1;   // < 0: unknown (nothing is refused)
  std::string source;  // "MemAvailable", "cgroup v2 memory.max 16.00 GiB", "CUDA device 0 free"
};
AvailableMemory available_memory(bool cuda, int device = 0);

// Parsers for the files available_memory() reads (exposed for tests); -1 when absent.
double meminfo_available_bytes(const std::string& proc_meminfo);
double cgroup_limit_bytes(const std::string& memory_max);  // "max" and v1's "unlimited" huge value: -1
double memory_stat_bytes(const std::string& memory_stat, const std::string& field);

// "" when the plan fits `available`; else the message: the key(s) behind the largest term with their
// values, the estimate and what is available (with units), the breakdown, and which keys to lower
// (the largest value of each that fits) or train.memory_check=false to skip.
std::string memory_refusal(const MemoryPlan& plan, const AvailableMemory& available);

// The recipe's shared part of a plan (the stage adds its own keys); none when there is no
// config.json to read yet (model.path / model.config unset or without one: the stage reports that).
std::optional<MemoryPlan> memory_plan_from_recipe(const config::TrainingRecipe& r, StageKind stage);

}  // namespace ptk::train
