// Data-parallel gradient sum: gradients are copied into flattened buckets (~25 MB, DDP's default)
// as backward produces them and each full bucket's all-reduce starts at once, so communication
// overlaps the rest of backward. Not an optimizer, nor loss scaling: the loss is already divided by
// the global target count, so the plain sum over ranks is the gradient.
// Threading: arm()/finish() on the training thread; the hooks run on autograd's thread for the
// device (the calling thread on CPU). Owns hooks on the parameters; removes them when destroyed.
#pragma once
#include <memory>

#include "core/parallel/comm.h"    // Comm
#include "core/optim/adamw.h"  // NamedTensors

namespace ptk::parallel {

class GradSync {
 public:
  // `params`: every rank passes the same names in the same order. With world size 1 it does nothing.
  GradSync(Comm comm, optim::NamedTensors params, double bucket_mb = 25);
  ~GradSync();
  GradSync(const GradSync&) = delete;
  GradSync& operator=(const GradSync&) = delete;

  // Before the backward of the optimizer step's last micro-batch (earlier ones accumulate locally,
  // DDP's no_sync): from now on each finished gradient (accumulated .grad + this backward's part)
  // goes into its bucket, and buckets are launched in a fixed order (the same on every rank).
  void arm();
  // After that backward: launches the buckets still open (parameters without a gradient here),
  // waits for all of them and writes the sums into .grad. A parameter no rank produced a gradient
  // for keeps an undefined .grad (the optimizer skips it, as with one process).
  void finish();

  int num_buckets() const;
  // Buckets whose all-reduce started while backward was still running, in the last finish().
  int launched_during_backward() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::parallel
