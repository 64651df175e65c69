// The recipe sections every stage shares (docs/DESIGN.md, "Recipe keys every stage shares"). Defaults
// live in sections.cpp's visit() and nowhere else. Stage sections (sft, dpo, ...) live in the stages.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config/options.h"

namespace ptk::config {

struct RunSection : Section {
  std::string dir;   // "" = runs/<recipe file name>
  int64_t seed;
  int64_t threads;   // 0 = OMP_NUM_THREADS, else all cores
  std::string device;  // auto | cpu | cuda | cuda:N | meta (core/runtime/device.h)
  const char* name() const override { return "run"; }
  const char* help() const override { return "where outputs go, the seed, threads, the device"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

struct ModelSection : Section {
  std::string path;    // HF folder to start from (or a PEFT adapter folder: its base with the adapter merged)
  std::string adapter; // PEFT adapter folder whose LoRA weights training starts from (model.lora)
  std::string config;  // config.json for random init
  std::string dtype;   // auto | float32 | bfloat16
  bool activation_checkpointing;  // recompute each decoder layer in backward (less memory, ~1/3 more compute)
  // Whether the trained parameters are bf16 on a GPU (`cuda`) or the CPU: bfloat16, or auto on a GPU.
  bool bf16_params(bool cuda) const { return dtype == "bfloat16" || (dtype == "auto" && cuda); }
  const char* name() const override { return "model"; }
  const char* help() const override { return "the model to start from"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

// LoRA (core/model/lora.h): the base frozen, low-rank adapters trained, saved in PEFT's layout.
struct LoraSection : Section {
  bool enabled;
  int64_t rank;
  double alpha, dropout;
  std::vector<std::string> targets;          // q_proj ... down_proj, or all-linear
  bool rslora;
  std::string init;                          // default | gaussian
  std::vector<std::string> modules_to_save;  // score | embed_tokens | lm_head
  bool save_merged;                          // also write run.dir/final-merged (a plain HF folder)
  const char* name() const override { return "model.lora"; }
  const char* help() const override { return "LoRA adapters (PEFT's files): train them instead of the whole model"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

struct TokenizerSection : Section {
  std::string path;                  // "" = model.path
  std::string chat_template;         // auto | qwen2.5 | chatml | a .jinja file | inline Jinja text
  std::string chat_template_kwargs;  // JSON object text of extra template variables; "" = none
  const char* name() const override { return "tokenizer"; }
  const char* help() const override { return "tokenizer files and chat template"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

struct DataSection : Section {
  std::vector<DataSource> train, eval;
  int64_t max_seq_len;
  bool packing;
  std::string on_error;  // fail | skip
  std::map<std::string, std::string> columns;  // ptk field -> the dataset's column name
  double eval_split;     // 0, or the fraction of data.train held out for eval
  const char* name() const override { return "data"; }
  const char* help() const override { return "training and evaluation data"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

struct TrainSection : Section {
  int64_t epochs, max_steps, micro_batch_size, grad_accum, eval_every, log_every;
  bool zero1;            // the older spelling of sharding = "zero1"
  std::string sharding;  // none | zero1 | zero2 (issue #30 adds full); sharding_mode() resolves zero1
  // The mode the run uses: "zero1" when train.zero1 is true, else train.sharding (validate() refuses
  // train.zero1=true beside zero2).
  std::string sharding_mode() const { return zero1 ? "zero1" : sharding; }
  bool memory_check;  // refuse a recipe whose memory estimate exceeds this machine (core/train/memory_estimate.h)
  bool tensorboard;   // TensorBoard event files in run.dir/tb (core/train/tensorboard.h)
  const char* name() const override { return "train"; }
  const char* help() const override { return "the step loop"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

struct OptimSection : Section {
  double lr, min_lr, weight_decay, clip_grad_norm, eps;
  std::string schedule;  // constant | linear | cosine
  int64_t warmup_steps;
  std::vector<double> betas;
  const char* name() const override { return "optim"; }
  const char* help() const override { return "AdamW and its learning-rate schedule"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

struct CheckpointSection : Section {
  int64_t every, keep_last;
  std::string max_shard_size;  // "5GB", "500MB", "2GiB" or bytes, as transformers' max_shard_size
  // max_shard_size in bytes (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2, as in transformers).
  uint64_t max_shard_bytes() const;
  const char* name() const override { return "checkpoint"; }
  const char* help() const override { return "checkpoint cadence"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

// Data parallelism (ranks come from torchrun's environment or `ptk launch`).
struct DistSection : Section {
  double timeout_s;
  std::string backend;  // auto | gloo | nccl
  const char* name() const override { return "dist"; }
  const char* help() const override { return "data parallel over c10d (ptk launch -n N, or torchrun)"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

// Which kernels run (core/kernels/dispatch.h); auto = by device and dtype. Set once per process by
// the stages (kernels::configure); the PTK_* environment variables are aliases of the auto values.
struct KernelsSection : Section {
  std::string attention;         // auto | ref | cpu_flash | cpu_block | sdpa | flash_varlen
  int64_t attention_block_rows;  // cpu_block's query block; 0 = default (128)
  std::string packed_attention;  // auto | batched | per_document
  std::string decode_attention;  // auto | rows | window | gather | batched
  std::string lm_head;           // auto | cpu_rows | ref
  const char* name() const override { return "kernels"; }
  const char* help() const override { return "which attention / decode / lm_head kernels run (auto: by device and dtype)"; }
  void visit(Visitor& v) override;
  void validate(Errors& e) const override;
};

// Top-level keys.
struct RootSection : Section {
  std::string resume;  // auto | never | a checkpoint path
  const char* name() const override { return ""; }
  const char* help() const override { return "top-level keys (`base` is read by the loader)"; }
  void visit(Visitor& v) override;
};

// The shared sections of a training stage, in help order. A stage adds its own section(s).
struct TrainingRecipe {
  RootSection root;
  RunSection run;
  ModelSection model;
  LoraSection lora;  // model.lora
  TokenizerSection tokenizer;
  DataSection data;
  TrainSection train;
  OptimSection optim;
  CheckpointSection checkpoint;
  DistSection dist;
  KernelsSection kernels;
  std::vector<Section*> sections() {
    return {&root, &run, &model, &lora, &tokenizer, &data, &train, &optim, &checkpoint, &dist, &kernels};
  }
};

// runs/<recipe file name without .json> when run.dir is empty.
std::string default_run_dir(const std::string& recipe_file);

}  // namespace ptk::config
