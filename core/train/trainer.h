// The step loop every stage shares: K micro-batches per optimizer step with the loss normalized by
// the step's target count, clipping, the NaN guard, the schedule, metrics.jsonl, the progress line,
// periodic eval, crash-safe checkpoints (HF folder + trainer_state/), keep-last-K, final/, and exact
// resume. Not a stage: data, loss and model saving come from a Stage. One process (data parallel
// joins through core/dist).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/optim/adamw.h"    // AdamW, NamedTensors
#include "core/train/metrics.h"  // Metrics

namespace ptk::train {

// One micro-batch, opaque to the loop.
struct MicroBatch {
  std::shared_ptr<void> data;  // the stage's own batch type
  int64_t targets = 0;         // loss-normalizing count this micro-batch adds to the step's N
  int64_t tokens = 0;          // tokens processed (tokens/s, MFU)
};

struct LossOut {
  at::Tensor loss;  // scalar, already divided by the step's N: the loop calls backward() on it
  Metrics metrics;  // per-micro-batch values; the loop logs their mean over the step (as TRL)
};

class Stage {
 public:
  virtual ~Stage() = default;
  // The trainable parameters, HF names; updated in place by the optimizer.
  virtual optim::NamedTensors parameters() = 0;
  // Micro-batches in one epoch of the training data.
  virtual int64_t micro_batches_per_epoch() const = 0;
  // The next micro-batch; crosses into the next epoch by itself (the loop decides when to stop).
  virtual MicroBatch next_micro_batch() = 0;
  // Data position, saved in checkpoints (any JSON value) and restored on resume.
  virtual std::string cursor_json() const = 0;
  virtual void restore_cursor(const std::string& json) = 0;
  // Loss of one micro-batch given the optimizer step's total target count.
  virtual LossOut loss(const MicroBatch& mb, double step_targets) = 0;
  // Held-out metrics (names get an "eval/" prefix); default: none.
  virtual void evaluate(Metrics* out) {}
  // Writes the model as a plain HF folder (config, weights, tokenizer files).
  virtual void save_model(const std::string& dir) = 0;
  // Model FLOPs per trained token (6N + attention) for MFU; 0 = not reported.
  virtual double flops_per_token() const { return 0; }
};

struct TrainerOptions {
  std::string run_dir;
  std::string resolved_recipe;  // written as config.json and into every checkpoint
  std::string resume = "auto";  // auto | never | a checkpoint folder
  int64_t seed = 0;
  // Loop
  int64_t epochs = 1, max_steps = -1, grad_accum = 1, eval_every = 0, log_every = 1;
  // Optimizer
  double lr = 1e-5, min_lr = 0.0, clip_grad_norm = 1.0;
  std::string schedule = "cosine";
  int64_t warmup_steps = 0;
  optim::AdamWOptions adamw;
  // Checkpoints
  int64_t checkpoint_every = 0, keep_last = 2;
  // Peak FLOP/s MFU is computed against; 0 = measure an fp32 matmul at start.
  double peak_flops = 0;
  int max_bad_steps = 5;  // NaN guard
  std::string label = "train";
};

class Trainer {
 public:
  Trainer(Stage& stage, TrainerOptions options);
  ~Trainer();

  // Resumes (per options.resume), trains to the end, evaluates, writes final/. Returns the
  // number of optimizer steps taken in this call.
  int64_t run();

  int64_t step() const;
  int64_t total_steps() const;
  const optim::AdamW& optimizer() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Copies the tensors of an HF folder into `params` by name (in place, so optimizer references
// stay valid); refuses a missing or mis-shaped tensor.
void load_weights_into(const optim::NamedTensors& params, const std::string& dir);

// fp32 matmul FLOP/s of this process (1024^3, ~0.3 s): the CPU peak MFU is measured against.
double measure_matmul_flops();

}  // namespace ptk::train
