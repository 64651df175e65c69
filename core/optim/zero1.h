// ZeRO-1 (Rajbhandari et al. 2020, stage 1; DeepSpeed's flat partition): the parameters are viewed
// as one flat vector split into world_size equal slices; each rank keeps AdamW's moments (and fp32
// master weights) for its slice only, updates it from the already summed gradients, then the
// parameters are all-gathered. Not gradient sharding (ZeRO-2): every rank still holds full gradients.
// Threading: one owner thread; step() is a collective (every rank calls it, in the same order).
#pragma once
#include <cstdint>
#include <memory>

#include "core/parallel/comm.h"    // Comm
#include "core/optim/adamw.h"  // AdamW, AdamWOptions, NamedTensors

namespace ptk::optim {

class Zero1AdamW {
 public:
  // `params` in the same order on every rank, contiguous, one dtype and device.
  Zero1AdamW(parallel::Comm comm, NamedTensors params, AdamWOptions opt);
  ~Zero1AdamW();

  // Updates this rank's slice from the parameters' .grad() (equal on every rank), then all-gathers.
  void step(double lr);
  void zero_grad();
  int64_t steps() const;

  // This rank's shard: "exp_avg.<name>", "exp_avg_sq.<name>" ("master.<name>" for non-fp32
  // parameters) for the part of each parameter in the slice, plus "zero1.range.<name>" = (begin,
  // end) within the flattened parameter. load_state() refuses a shard cut for another layout.
  NamedTensors state() const;
  void load_state(const NamedTensors& tensors, int64_t step);

  // Elements of the flattened parameters, and this rank's [begin, end) slice of them.
  int64_t numel() const;
  int64_t shard_begin() const;
  int64_t shard_end() const;
  // The AdamW over this rank's slices.
  const AdamW& local() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::optim
