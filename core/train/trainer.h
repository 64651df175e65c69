// The step loop every stage shares: K micro-batches per optimizer step with the loss normalized by
// the step's target count, clipping, the NaN guard, the schedule, metrics.jsonl, the progress line,
// periodic eval, crash-safe checkpoints (HF folder + trainer_state/), keep-last-K, final/, and exact
// resume, and data parallelism over a parallel::Comm (global target count, bucketed gradient sum,
// optional ZeRO-1 or ZeRO-2; rank 0 writes). Not a stage: data, loss and model saving come from a Stage.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include "core/parallel/comm.h"      // Comm
#include "core/optim/adamw.h"    // AdamW, NamedTensors
#include "core/train/metrics.h"  // Metrics

namespace ptk::train {

// One micro-batch, opaque to the loop. Stages make and read them through TypedStage<Batch> (below),
// which checks `type`: a stage cannot be handed another stage's batch.
struct MicroBatch {
  std::shared_ptr<void> data;            // the stage's own batch type, already on the model's device
  int64_t targets = 0;                   // loss-normalizing count this micro-batch adds to the step's N
  int64_t tokens = 0;                    // tokens processed (tokens/s, MFU)
  const std::type_info* type = nullptr;  // typeid of *data (TypedStage sets and checks it)
};

// A ratio metric whose numerator and denominator are each summed over ranks before dividing
// (docs/FORMULAS.md section 0), e.g. mean_token_accuracy = correct / targets.
struct Ratio {
  std::string name;
  double num = 0, den = 0;
};

// A Ratio whose numerator and denominator are 0-dim tensors on the model's device (read by the loop
// once per optimizer step, with the loss and the gradient norm: no host synchronisation per micro-batch).
struct TensorRatio {
  std::string name;
  at::Tensor num, den;
};

struct LossOut {
  at::Tensor loss;  // scalar, already divided by the step's N: the loop calls backward() on it
  Metrics metrics;  // per-micro-batch values; logged: their mean over the step's micro-batches and ranks
  std::vector<Ratio> ratios;  // per micro-batch sum(num)/sum(den) over ranks, then the mean over micro-batches
  // Per-micro-batch values as 0-dim tensors (any dtype, on the model's device), logged exactly like
  // `metrics` (mean of the finite values over micro-batches and ranks; a name may appear in both).
  std::vector<std::pair<std::string, at::Tensor>> tensor_metrics;
  std::vector<TensorRatio> tensor_ratios;  // as `ratios`
  // The step's only host reads: a stage whose metrics come from device tensors keeps them (detached)
  // in this closure, which fills `metrics` and `ratios` when the loop calls it, after the step's
  // backward passes, instead of reading them back (a device synchronisation) inside loss(). The
  // loop calls it once per LossOut before it reads metrics/ratios; empty: nothing to read.
  std::function<void(LossOut&)> read_back;
};

class Stage {
 public:
  virtual ~Stage() = default;
  // Called once by the Trainer, before anything else: this process is `rank` of `world_size`
  // data-parallel ranks and must read only its share of the data, with the same number of
  // micro-batches per epoch on every rank. The default accepts world size 1 only.
  virtual void set_rank(int rank, int world_size);
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
  // Writes the model as a plain HF folder (config, weights, tokenizer files), or with LoRA the PEFT
  // adapter folder (stage_setup.h's save_policy_model); checkpoints and final/ are this folder.
  virtual void save_model(const std::string& dir) = 0;
  // Rank 0, right after final/ is written: what goes beside it (LoRA's final-merged/). Default: nothing.
  virtual void after_final(const std::string& run_dir) {}
  // Bytes of parameters the model holds that parameters() leaves out (a frozen LoRA base): the
  // loop's memory check counts them as weights without gradients or optimizer state.
  virtual double frozen_bytes() const { return 0; }
  // Model FLOPs per trained token (6N + attention) for MFU; 0 = not reported.
  virtual double flops_per_token() const { return 0; }
};

// A Stage whose micro-batches are `Batch`es: it owns the cast from MicroBatch::data, so a stage's
// loss() only ever sees its own batch type (a MicroBatch of another type is refused).
template <class Batch>
class TypedStage : public Stage {
 public:
  MicroBatch next_micro_batch() final {
    int64_t targets = 0, tokens = 0;
    auto b = std::make_shared<Batch>(next_batch(&targets, &tokens));
    return {std::move(b), targets, tokens, &typeid(Batch)};
  }
  LossOut loss(const MicroBatch& mb, double step_targets) final {
    if (!mb.data || !mb.type || *mb.type != typeid(Batch))
      throw std::logic_error(std::string("a micro-batch of type ") + (mb.type ? mb.type->name() : "unknown") +
                             " was handed to a stage that reads " + typeid(Batch).name());
    return batch_loss(*static_cast<const Batch*>(mb.data.get()), step_targets);
  }

 protected:
  // The next micro-batch, on the model's device; sets its target and token counts (host-side).
  virtual Batch next_batch(int64_t* targets, int64_t* tokens) = 0;
  virtual LossOut batch_loss(const Batch& batch, double step_targets) = 0;
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
  // Peak FLOP/s MFU is computed against; 0 = the theoretical peak of this process's CPU threads
  // (core/train/peak_flops.h) or, with the parameters on a CUDA device, that device's dense peak
  // (core/train/device_peak.h); no MFU when that is unknown.
  double peak_flops = 0;
  // TensorBoard event files in run_dir/tb (core/train/tensorboard.h), one per process start.
  bool tensorboard = true;
  int max_bad_steps = 5;  // NaN guard
  // Memory one rank may use for weights, gradients and optimizer state; a model whose estimate
  // exceeds it is refused before training starts (14B-72B need sharding beyond ZeRO-1). 0 = this
  // machine's physical memory divided by the local ranks (CPU), or the CUDA device's free memory plus
  // what the parameters already hold there (unchecked when that cannot be read).
  double memory_budget_bytes = 0;
  // The stage's name ("sft", "dpo", "rm", "grpo"): it picks the metrics of the progress line, the eval
  // lines, the end-of-run summary and report.md (core/train/stage_view.h).
  std::string label = "train";
  // Metrics plotted in report.md besides the stage's own (stage_view(label).plots).
  std::vector<std::string> report_metrics;
  // Data parallel. The default Comm is world size 1 (one process, no process group).
  // A rank's micro-batch holds its share of the step; N, gradients and metrics are summed over ranks.
  parallel::Comm comm;
  // ZeRO-1 (recipe key train.zero1): each rank keeps AdamW moments/master weights for 1/world of
  // the parameters only (less memory), at the cost of an all-gather of the parameters per step.
  // Checkpoints then hold one optimizer shard per rank: resume needs the same world size.
  bool zero1 = false;
  // Sharding over the data-parallel ranks (recipe key train.sharding): "none" | "zero1" (as zero1
  // above) | "zero2" (gradients too: each rank keeps only its shard of the summed gradient, reduce-
  // scattered bucket by bucket during every micro-batch's backward; core/optim/zero2.h). zero1 = true
  // means "zero1" and conflicts with "zero2" (sharding_mode()). Checkpoints of zero1 and zero2 hold one
  // optimizer shard per rank: resume needs the same world size and mode.
  std::string sharding = "none";
  // Gradient all-reduce (ZeRO-2: reduce-scatter) bucket size in MiB (DDP's bucket_cap_mb): smaller overlaps more, larger
  // costs fewer collectives.
  double bucket_mb = 25;
};

// With options.comm of world size > 1, every rank builds a Trainer with the same options (and a
// Stage set to its rank) and calls run(); run() is then a sequence of collectives: a rank that
// fails makes the others fail within options.comm's timeout.
class Trainer {
 public:
  Trainer(Stage& stage, TrainerOptions options);
  ~Trainer();

  // Resumes (per options.resume), trains to the end, evaluates, writes final/. Returns the
  // number of optimizer steps taken in this call.
  int64_t run();

  int64_t step() const;
  int64_t total_steps() const;
  // The AdamW this rank runs (with ZeRO-1 or ZeRO-2: over its slices of the parameters only).
  const optim::AdamW& optimizer() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The sharding a Trainer runs: options.sharding, or "zero1" for options.zero1; throws ptk::Error for
// zero1 = true with sharding "zero2" (or an unknown name), naming both keys.
std::string sharding_mode(const TrainerOptions& options);

// Bytes one rank needs for weights + gradients (parameter dtype) + AdamW moments and fp32 master
// weights (split across ranks with ZeRO-1; gradients too with ZeRO-2). Activations are not included.
double training_state_bytes(const optim::NamedTensors& params, int world_size, bool zero1);
// `sharding`: "none" | "zero1" | "zero2".
double training_state_bytes(const optim::NamedTensors& params, int world_size, const std::string& sharding);

// Copies the tensors of an HF folder into `params` by name (in place, so optimizer references
// stay valid); refuses a missing or mis-shaped tensor.
void load_weights_into(const optim::NamedTensors& params, const std::string& dir);

// fp32 matmul FLOP/s of this process (the best 2048^3 product in ~1 s). No longer what MFU is
// computed against (its result falls whenever other processes share the cores: see peak_flops.h).
double measure_matmul_flops();

}  // namespace ptk::train
