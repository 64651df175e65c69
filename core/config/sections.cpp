#include "core/config/sections.h"

#include <set>

#include <rapidjson/document.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <limits>
#include <utility>

#include "core/runtime/device_spec.h"
#include "core/util/error.h"

namespace ptk::config {

namespace {
std::string q(const std::string& s) { return "\"" + s + "\""; }
}  // namespace

void RunSection::visit(Visitor& v) {
  v.opt(dir, "dir", "", "output folder; empty = runs/<recipe file name>, so a rerun finds its checkpoints");
  v.opt(seed, "seed", 1234, "the one seed that data order, init and sampling derive from");
  v.opt(threads, "threads", 0, "CPU threads; 0 = $OMP_NUM_THREADS or else every core");
  v.opt(device, "device", "auto",
        "where the model runs: auto (cuda:LOCAL_RANK when a GPU is there, else cpu) | cpu | cuda | cuda:N");
}
void RunSection::validate(Errors& e) const {
  if (threads < 0) e.add("run.threads must be >= 0, got " + std::to_string(threads));
  if (!runtime::valid_device_spec(device))
    e.add("run.device = \"" + device + "\" is not a device: auto | cpu | cuda | cuda:N (a GPU index)");
}

void ModelSection::visit(Visitor& v) {
  v.opt(path, "path", "", "Hugging Face model folder (config.json + *.safetensors) to start from");
  v.opt(config, "config", "", "a config.json for random init (instead of model.path)");
  v.opt(adapter, "adapter", "",
        "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to start the LoRA weights from; "
        "needs model.lora.enabled=true with the adapter's rank, alpha, targets and rslora. (A model.path that is an "
        "adapter folder is different: that adapter is merged into its base, which is then trained)");
  v.choice(dtype, "dtype", "auto", {"auto", "float32", "bfloat16"},
           "dtype of the trained model's parameters (bfloat16: AdamW keeps fp32 master weights and moments; "
           "the lm_head log-softmax runs in fp32); auto = bfloat16 when run.device is a GPU, float32 on the "
           "CPU (where bf16 is emulated and ~3x slower)");
  v.opt(activation_checkpointing, "activation_checkpointing", false,
        "keep only each decoder layer's input and recompute the layer in backward: activation memory per "
        "layer falls from ~40 (tokens x hidden) tensors plus attention probabilities to one, for ~1/3 more compute");
}
void ModelSection::validate(Errors& e) const {
  if (!path.empty() && !config.empty())
    e.add("model.path (" + q(path) + ") and model.config (" + q(config) + ") are exclusive: set one");
}

void LoraSection::visit(Visitor& v) {
  v.opt(enabled, "enabled", false,
        "train LoRA adapters instead of the whole model (TRL's use_peft): the base weights stay frozen in model.dtype "
        "(no gradients, no optimizer state); checkpoints and final/ are PEFT adapter folders");
  v.opt(rank, "rank", 16, "the adapters' rank r (PEFT's r, TRL's lora_r)");
  v.opt(alpha, "alpha", 32.0, "lora_alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)");
  v.opt(dropout, "dropout", 0.0,
        "lora_dropout on the adapters' input while training (0 keeps GRPO's ratio exactly 1 on its first pass)");
  v.opt(targets, "targets", {"all-linear"},
        "linears that get adapters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or all-linear (all "
        "seven; PEFT's default for Qwen2 is [q_proj, v_proj])");
  v.opt(rslora, "rslora", false, "rank-stabilized LoRA: scale by alpha / sqrt(rank) (PEFT's use_rslora)");
  v.choice(init, "init", "default", {"default", "gaussian"},
           "adapter initialisation, B always zero: default = A Kaiming-uniform as PEFT (U(+-1/sqrt(in))) | gaussian "
           "= A normal(0, 1/rank)");
  v.opt(modules_to_save, "modules_to_save", {},
        "whole modules trained and saved beside the adapters: score (ptk rm adds it always, as PEFT does for "
        "SEQ_CLS), embed_tokens, lm_head (models with untied embeddings)");
  v.opt(save_merged, "save_merged", false,
        "also write run.dir/final-merged: the base with the adapters merged, a plain HF folder (ptk merge-lora does "
        "the same afterwards)");
}
void LoraSection::validate(Errors& e) const {
  if (rank < 1) e.add("model.lora.rank must be >= 1, got " + std::to_string(rank));
  if (!(alpha > 0)) e.add("model.lora.alpha must be > 0");
  if (!(dropout >= 0 && dropout < 1)) e.add("model.lora.dropout must be in [0, 1)");
  static const std::set<std::string> linears{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                             "all-linear"};
  if (targets.empty()) e.add("model.lora.targets is empty: name the linears to adapt, or all-linear");
  for (const auto& t : targets)
    if (!linears.count(t))
      e.add("model.lora.targets holds " + q(t) + ": Qwen2's linears are q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj (or all-linear)");
  for (const auto& m : modules_to_save)
    if (m != "score" && m != "embed_tokens" && m != "lm_head")
      e.add("model.lora.modules_to_save holds " + q(m) + ": ptk saves score, embed_tokens or lm_head");
}

void TokenizerSection::visit(Visitor& v) {
  v.opt(path, "path", "", "tokenizer folder or tokenizer.json; empty = model.path");
  v.opt(chat_template, "chat_template", "auto",
        "chat template: auto (the tokenizer folder's own: chat_template.jinja, else tokenizer_config.json's) | "
        "qwen2.5 | chatml (built in) | a .jinja file | inline Jinja text; written into checkpoints and final/");
  v.opt(chat_template_kwargs, "chat_template_kwargs", "",
        "extra template variables as a JSON object, e.g. {\"enable_thinking\": false} (apply_chat_template's kwargs)");
}
void TokenizerSection::validate(Errors& e) const {
  const std::string& t = chat_template;
  bool named = t == "auto" || t == "qwen2.5" || t == "chatml";
  bool is_inline = t.find("{{") != std::string::npos || t.find("{%") != std::string::npos;
  std::error_code ec;
  if (!named && !is_inline && !std::filesystem::is_regular_file(t, ec))
    e.add("tokenizer.chat_template: `" + t + "` is neither auto, qwen2.5, chatml nor an existing file (a .jinja "
          "chat template); relative paths are from the working directory");
  if (!chat_template_kwargs.empty()) {
    rapidjson::Document d;
    d.Parse(chat_template_kwargs.c_str(), chat_template_kwargs.size());
    if (d.HasParseError() || !d.IsObject())
      e.add("tokenizer.chat_template_kwargs: `" + chat_template_kwargs +
            "` is not a JSON object (e.g. {\"enable_thinking\": false})");
  }
}

void DataSection::visit(Visitor& v) {
  v.opt(train, "train", "training files or globs: \"a.jsonl\" or [{\"path\": \"a*.jsonl\", \"weight\": 2}]");
  v.opt(eval, "eval", "held-out files or globs, same form as data.train");
  v.opt(max_seq_len, "max_seq_len", 2048, "tokens per row; longer records are truncated (counted)");
  v.opt(packing, "packing", true, "pack several documents per row (attention never crosses them)");
  v.choice(on_error, "on_error", "fail", {"fail", "skip"},
           "bad record policy: fail stops before training; skip counts and lists every skipped line");
  v.opt(columns, "columns",
        "rename the dataset's columns to ptk's fields, e.g. {\"prompt\": \"question\", \"completion\": \"answer\"} "
        "(fields: messages conversations prompt completion text chosen rejected answer instruction input output "
        "system history)");
  v.opt(eval_split, "eval_split", 0.0,
        "hold out this fraction of data.train (0 < f < 1) for eval, chosen by a hash of each record (the same "
        "records every run); 0 = none; needs data.eval empty");
}
void DataSection::validate(Errors& e) const {
  if (max_seq_len < 2) e.add("data.max_seq_len must be >= 2, got " + std::to_string(max_seq_len));
  static const char* kFields[] = {"messages", "conversations", "prompt", "completion", "text", "chosen", "rejected",
                                  "answer", "instruction", "input", "output", "system", "history"};
  std::map<std::string, std::string> seen;  // column -> field
  for (const auto& [field, column] : columns) {
    if (std::find_if(std::begin(kFields), std::end(kFields), [&](const char* f) { return field == f; }) ==
        std::end(kFields)) {
      std::string all;
      for (const char* f : kFields) all += (all.empty() ? "" : " ") + std::string(f);
      e.add("data.columns." + field + ": " + q(field) + " is not a field ptk reads (" + all +
            "); a mapping goes {\"ptk field\": \"your column\"}");
    }
    if (column.empty()) e.add("data.columns." + field + " is empty: name the dataset's column");
    auto [it, fresh] = seen.emplace(column, field);
    if (!fresh) e.add("data.columns." + it->second + " and data.columns." + field + " both take column " + q(column));
  }
  if (!(eval_split >= 0 && eval_split < 1))
    e.add("data.eval_split must be a fraction in [0, 1) (0 = none), got " + std::to_string(eval_split));
  else if (eval_split > 0 && !eval.empty())
    e.add("data.eval_split (" + std::to_string(eval_split) + ") and data.eval are exclusive: set one");
}

void TrainSection::visit(Visitor& v) {
  v.opt(epochs, "epochs", 1, "passes over data.train (max_steps wins when both are set)");
  v.opt(max_steps, "max_steps", -1,
        "optimizer steps; -1 = from train.epochs (TRL's max_steps=-1); a positive value overrides epochs");
  v.opt(micro_batch_size, "micro_batch_size", 1, "rows per forward/backward; higher uses more memory");
  v.opt(grad_accum, "grad_accum", 1, "micro-batches per optimizer step");
  v.opt(eval_every, "eval_every", 0, "steps between evaluations; 0 = only at the end");
  v.opt(log_every, "log_every", 1, "steps between progress lines (metrics.jsonl gets every step)");
  v.opt(zero1, "zero1", false,
        "ZeRO-1: each rank keeps 1/N of the optimizer state (less memory, one all-gather a step); "
        "resume needs the same number of ranks. The older spelling of train.sharding=zero1");
  v.choice(sharding, "sharding", "none", {"none", "zero1", "zero2"},
           "what the N data-parallel ranks split: none | zero1 (AdamW moments and fp32 masters: 1/N each, one "
           "all-gather of the weights a step) | zero2 (also the gradients: each micro-batch's are reduce-scattered "
           "during backward, so a rank holds 1/N of them; grad_accum reduce-scatters a step); weights stay whole on "
           "every rank. Resume needs the same mode and number of ranks; train.zero1=true means zero1");
  v.opt(memory_check, "memory_check", true,
        "before loading anything, estimate the run's peak memory (weights, gradients, AdamW state, "
        "activations, logits, KV cache) and refuse the recipe when it exceeds the memory available here, "
        "naming the key to lower; false skips this and the trainer's check of the loaded weights");
  v.opt(tensorboard, "tensorboard", true,
        "write TensorBoard event files to run.dir/tb (every metrics.jsonl value, as train/<name> and eval/<name>; "
        "`tensorboard --logdir <run.dir>/tb`, or `wandb sync --sync-tensorboard`); false writes none");
}
void TrainSection::validate(Errors& e) const {
  // TRL: max_steps=-1 means "use num_train_epochs", a positive value overrides. 0 (which once
  // trained a full epoch here without a word) and other values below -1 are refused.
  if (max_steps == 0 || max_steps < -1)
    e.add("train.max_steps must be -1 (train for train.epochs) or >= 1, got " + std::to_string(max_steps));
  else if (epochs < 1 && max_steps < 1)
    e.add("train.epochs (" + std::to_string(epochs) + ") or train.max_steps (" + std::to_string(max_steps) +
          ") must be >= 1");
  if (micro_batch_size < 1) e.add("train.micro_batch_size must be >= 1, got " + std::to_string(micro_batch_size));
  if (grad_accum < 1) e.add("train.grad_accum must be >= 1, got " + std::to_string(grad_accum));
  if (eval_every < 0) e.add("train.eval_every must be >= 0, got " + std::to_string(eval_every));
  if (log_every < 1) e.add("train.log_every must be >= 1, got " + std::to_string(log_every));
  if (zero1 && sharding != "none" && sharding != "zero1")
    e.add("train.zero1=true (the older spelling of train.sharding=zero1) conflicts with train.sharding=" + q(sharding) +
          ": drop train.zero1, or set train.sharding=zero1");
}

void OptimSection::visit(Visitor& v) {
  v.opt(lr, "lr", 1e-5, "peak learning rate (after warmup)");
  v.opt(min_lr, "min_lr", 0.0, "floor the schedule decays to (the Qwen2.5 report's SFT: 7e-6 -> 7e-7)");
  v.choice(schedule, "schedule", "cosine", {"constant", "linear", "cosine"}, "decay after warmup");
  v.opt(warmup_steps, "warmup_steps", 0, "linear warmup steps from 0 to optim.lr");
  v.opt(weight_decay, "weight_decay", 0.0, "decoupled (AdamW) decay; never applied to norms and biases");
  v.opt(betas, "betas", {0.9, 0.999}, "AdamW (beta1, beta2)");
  v.opt(eps, "eps", 1e-8, "AdamW epsilon");
  v.opt(clip_grad_norm, "clip_grad_norm", 1.0, "clip by global L2 norm; 0 = no clipping");
}
void OptimSection::validate(Errors& e) const {
  if (!(lr > 0)) e.add("optim.lr must be > 0, got " + std::to_string(lr));
  if (min_lr < 0 || min_lr > lr)
    e.add("optim.min_lr must be in [0, optim.lr]: min_lr=" + std::to_string(min_lr) + " lr=" + std::to_string(lr));
  if (betas.size() != 2 || betas[0] < 0 || betas[0] >= 1 || betas[1] < 0 || betas[1] >= 1)
    e.add("optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]");
  if (warmup_steps < 0) e.add("optim.warmup_steps must be >= 0, got " + std::to_string(warmup_steps));
  if (weight_decay < 0) e.add("optim.weight_decay must be >= 0, got " + std::to_string(weight_decay));
  if (clip_grad_norm < 0) e.add("optim.clip_grad_norm must be >= 0, got " + std::to_string(clip_grad_norm));
}

namespace {
// "5GB" -> 5e9, "2GiB" -> 2^31, "1234" -> 1234 (transformers' convert_file_size_to_int, bytes units);
// false for anything else, or zero.
bool parse_size(const std::string& s, uint64_t* out) {
  size_t i = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
  if (i == 0 || i > 18) return false;
  const uint64_t n = std::stoull(s.substr(0, i));
  static const std::pair<const char*, uint64_t> kUnits[] = {
      {"", 1},           {"B", 1},           {"KB", 1000ull},       {"MB", 1000000ull}, {"GB", 1000000000ull},
      {"KiB", 1ull << 10}, {"MiB", 1ull << 20}, {"GiB", 1ull << 30}};
  for (const auto& [unit, mult] : kUnits) {
    if (s.compare(i, std::string::npos, unit) == 0) {
      if (n == 0 || n > std::numeric_limits<uint64_t>::max() / mult) return false;
      *out = n * mult;
      return true;
    }
  }
  return false;
}
}  // namespace

void CheckpointSection::visit(Visitor& v) {
  v.opt(every, "every", 0, "steps between checkpoints; 0 = only final/");
  v.opt(keep_last, "keep_last", 2, "newest checkpoints kept in checkpoints/ (older ones are deleted)");
  v.opt(max_shard_size, "max_shard_size", "5GB",
        "largest weights file in a saved folder (final/, checkpoints/step-N/): bytes or e.g. 500MB, 2GiB; larger "
        "models are written as model-0000i-of-0000n.safetensors + model.safetensors.index.json (transformers' "
        "max_shard_size)");
}
uint64_t CheckpointSection::max_shard_bytes() const {
  uint64_t n = 0;
  if (!parse_size(max_shard_size, &n)) throw Error("checkpoint.max_shard_size: cannot read `" + max_shard_size + "`");
  return n;
}
void CheckpointSection::validate(Errors& e) const {
  if (every < 0) e.add("checkpoint.every must be >= 0, got " + std::to_string(every));
  if (keep_last < 1) e.add("checkpoint.keep_last must be >= 1, got " + std::to_string(keep_last));
  uint64_t n = 0;
  if (!parse_size(max_shard_size, &n))
    e.add("checkpoint.max_shard_size must be a positive size in bytes or with a unit (B, KB, MB, GB, KiB, MiB, GiB), "
          "e.g. \"5GB\", got \"" + max_shard_size + "\"");
}

void DistSection::visit(Visitor& v) {
  v.opt(timeout_s, "timeout_s", 300.0,
        "every collective fails after this many seconds (a dead rank stops the others); raise it for huge checkpoints");
  v.choice(backend, "backend", "auto", {"auto", "gloo", "nccl"},
           "auto = NCCL when run.device puts the model on a GPU (on builds with NCCL), else Gloo (a CPU run stays "
           "on Gloo even where GPUs exist)");
}
void DistSection::validate(Errors& e) const {
  if (!(timeout_s > 0)) e.add("dist.timeout_s must be > 0, got " + std::to_string(timeout_s));
}

void KernelsSection::visit(Visitor& v) {
  v.choice(attention, "attention", "auto", {"auto", "ref", "cpu_flash", "cpu_block", "sdpa", "flash_varlen"},
           "causal attention of training and prefill: auto (cuda: flash_varlen for packed bf16/fp16 rows, else "
           "sdpa; cpu float32: cpu_flash on AVX-512, else cpu_block; else ref) | ref (ATen matmuls, any device) | "
           "cpu_flash | cpu_block | sdpa (scaled_dot_product_attention, enable_gqa) | flash_varlen (CUDA bf16/fp16: "
           "packed documents in one call); a kernel that cannot serve a call falls back to auto's choice. "
           "Aliases: PTK_ATTENTION_FLASH=0 (cpu_block), PTK_ATTENTION_BLOCK_ROWS=0 (ref)");
  v.opt(attention_block_rows, "attention_block_rows", 0,
        "query positions per block of cpu_block; 0 = 128 (alias: PTK_ATTENTION_BLOCK_ROWS=N)");
  v.choice(packed_attention, "packed_attention", "auto", {"auto", "batched", "per_document"},
           "packed rows under a per-document kernel: auto = batched (short documents gathered into padded "
           "batches) | per_document (one attention per document); alias PTK_PACKED_ATTENTION=per-document");
  v.choice(decode_attention, "decode_attention", "auto", {"auto", "rows", "window", "gather", "batched"},
           "one decode step's attention over the KV cache: auto = rows (each sequence's own keys; CPU float32, "
           "AVX-512) where it serves, else batched (window or gather, whichever reads less) | window | gather; "
           "alias PTK_DECODE_ATTENTION=window|gather");
  v.choice(lm_head, "lm_head", "auto", {"auto", "cpu_rows", "ref"},
           "the lm_head log-prob op's passes over fp32 logits: auto = cpu_rows (AVX-512) where they serve | ref "
           "(ATen ops); alias PTK_LM_HEAD_ROWS=aten (ref)");
}
void KernelsSection::validate(Errors& e) const {
  if (attention_block_rows < 0)
    e.add("kernels.attention_block_rows must be >= 0 (0 = default), got " + std::to_string(attention_block_rows));
}

void RootSection::visit(Visitor& v) {
  v.opt(resume, "resume", "auto",
        "auto = continue from the newest complete checkpoint in run.dir; never; or a checkpoint path");
}

std::string default_run_dir(const std::string& recipe_file) {
  std::string stem = recipe_file.empty() ? "adhoc" : std::filesystem::path(recipe_file).stem().string();
  return "runs/" + stem;
}

}  // namespace ptk::config
