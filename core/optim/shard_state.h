// The checkpoint of a sharded AdamW (ZeRO-1, ZeRO-2): AdamW's state over this rank's slices plus one
// "<prefix>.range.<name>" = (begin, end) per slice, the elements of the flattened parameter it
// covers, so that a shard cut for another layout is refused on load. Not the sharding itself.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/optim/adamw.h"  // NamedTensors

namespace ptk::optim {

struct ShardSlice {
  std::string name;    // the parameter's
  int64_t begin, end;  // within the flattened parameter
};

// `adamw_state` followed by the slices' ranges.
NamedTensors shard_state(NamedTensors adamw_state, const std::string& prefix, const std::vector<ShardSlice>& slices);

// The AdamW state in `tensors` (what shard_state wrote), after checking that its ranges are exactly
// `slices`; throws ptk::Error naming `what` ("ZeRO-1"), `rank` and `hint` otherwise.
NamedTensors shard_moments(const NamedTensors& tensors, const std::string& prefix, const std::vector<ShardSlice>& slices,
                           const std::string& what, int rank, const std::string& hint);

}  // namespace ptk::optim
