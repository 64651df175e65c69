// ZeRO-2 (Rajbhandari et al. 2020, stage 2): ZeRO-1's sharded AdamW plus sharded gradients. The
// flattened parameters are cut into buckets (~bucket_mb each, whole parameters, in reverse order:
// backward produces the last layers' gradients first); each bucket, a contiguous range of the flat
// vector, is split into world_size equal chunks (the last padded), and rank r owns chunk r of every
// bucket: the summed gradient, AdamW's moments and the fp32 master weights of those elements only.
// In backward, each parameter's gradient is copied into its bucket as soon as autograd has
// accumulated it, and its .grad freed; a full bucket is reduce-scattered at once (overlapping the rest
// of backward) and this rank's chunk is added into its gradient shard. After the update the chunks
// are all-gathered into the parameters, bucket by bucket. Not ZeRO-3: every rank holds all weights.
//
// Gradient accumulation: every micro-batch's backward is reduce-scattered into the shard (DeepSpeed's
// stage 2), so no rank ever holds more gradient than its shard plus the buckets in flight, at
// grad_accum reduce-scatters a step. (The alternative, accumulating whole gradients locally and
// reducing once, as GradSync does, holds a full gradient through the step: ZeRO-1's memory.) A
// reduce-scatter moves half an all-reduce's bytes: at grad_accum=2 the traffic equals plain data
// parallel's; beyond, it grows with grad_accum. Over Gloo (no native reduce-scatter) each bucket is an
// all-reduce whose chunk is kept: the same results, a full all-reduce's traffic per micro-batch.
// Threading: one owner thread; the hooks run on autograd's thread for the device (the calling thread
// on the CPU), while the owner waits in backward(). Every method is a collective or called in the
// same order on every rank.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "core/optim/adamw.h"     // AdamW, AdamWOptions, NamedTensors
#include "core/parallel/comm.h"   // Comm

namespace ptk::optim {

class Zero2AdamW {
 public:
  // `params` in the same order on every rank: contiguous, one dtype and device, requires_grad.
  // Registers a post-accumulate-grad hook on each (removed when destroyed).
  Zero2AdamW(parallel::Comm comm, NamedTensors params, AdamWOptions opt, double bucket_mb = 25);
  ~Zero2AdamW();
  Zero2AdamW(const Zero2AdamW&) = delete;
  Zero2AdamW& operator=(const Zero2AdamW&) = delete;

  // Around every micro-batch's backward. Between them, each gradient autograd accumulates goes into
  // its bucket (and its .grad is freed); end_backward() launches the buckets no gradient completed,
  // waits for all of them and adds this rank's chunks into the gradient shard.
  void begin_backward();
  void end_backward();

  // The L2 norm of the step's whole summed gradient (every rank's shard: the squared norms summed over
  // ranks), as a 0-dim tensor on the parameters' device (float64); scales the shard by
  // min(1, max_norm / (norm + 1e-6)) when max_norm > 0, as clip_grad_norm_tensor does for a whole
  // gradient, and leaves it as it is when the norm is not finite. On the CPU the decision is taken on
  // the host; on CUDA the norm, its all-reduce and the scaling stay on the device (no host read). But
  // the first call of a step (or step()) makes one small host all-reduce of which parameters had a
  // gradient on any rank (as GradSync does), so that AdamW skips those none had, as on one rank: on
  // NCCL that one waits for the device.
  at::Tensor clip_grad_norm(double max_norm);
  // Updates this rank's chunks from the gradient shard, then all-gathers the parameters: one
  // collective over a transient (world x shard_numel) buffer, the size of the parameters (ZeRO-1 keeps
  // such a buffer for the whole run); on NCCL it blocks the host until done, as ZeRO-1's does.
  void step(double lr);
  // Clears the gradient shard (and any .grad left by a backward outside begin/end_backward).
  void zero_grad();
  int64_t steps() const;

  // This rank's shard: AdamW's "exp_avg.<name>", "exp_avg_sq.<name>" ("master.<name>" for non-fp32
  // parameters) for the part of each parameter it owns, plus "zero2.range.<name>" = (begin, end)
  // within the flattened parameter. load_state() refuses a shard cut for another layout.
  NamedTensors state() const;
  void load_state(const NamedTensors& tensors, int64_t step);

  int64_t numel() const;        // elements of all parameters
  int64_t shard_numel() const;  // elements of this rank's gradient shard (with padding)
  int num_buckets() const;
  // Buckets whose reduce-scatter started while the last backward was still running.
  int launched_during_backward() const;
  // The AdamW over this rank's parameter slices.
  const AdamW& local() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::optim
