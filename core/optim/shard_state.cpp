#include "core/optim/shard_state.h"

#include <ATen/ATen.h>

#include <unordered_map>

#include "core/util/error.h"

namespace ptk::optim {

NamedTensors shard_state(NamedTensors adamw_state, const std::string& prefix, const std::vector<ShardSlice>& slices) {
  for (const auto& s : slices)
    adamw_state.emplace_back(prefix + ".range." + s.name, at::tensor({s.begin, s.end}, at::kLong));
  return adamw_state;
}

NamedTensors shard_moments(const NamedTensors& tensors, const std::string& prefix, const std::vector<ShardSlice>& slices,
                           const std::string& what, int rank, const std::string& hint) {
  const std::string range = prefix + ".range.";
  std::unordered_map<std::string, const at::Tensor*> by_name;
  for (auto& [n, t] : tensors) by_name[n] = &t;
  int ranges = 0;
  for (auto& [n, t] : tensors) ranges += n.rfind(range, 0) == 0;
  for (const auto& s : slices) {
    auto it = by_name.find(range + s.name);
    bool same = it != by_name.end() && it->second->numel() == 2 && (*it->second)[0].item<int64_t>() == s.begin &&
                (*it->second)[1].item<int64_t>() == s.end;
    if (!same)
      throw Error(what + " optimizer shard of rank " + std::to_string(rank) + " was cut for another layout (" + s.name +
                  " elements " + std::to_string(s.begin) + ".." + std::to_string(s.end) + " expected)" + hint);
  }
  if (ranges != static_cast<int>(slices.size()))
    throw Error(what + " optimizer shard of rank " + std::to_string(rank) + " holds " + std::to_string(ranges) +
                " parameter slices, this rank owns " + std::to_string(slices.size()) + hint);
  NamedTensors moments;
  for (auto& [n, t] : tensors)
    if (n.rfind(range, 0) != 0) moments.emplace_back(n, t);
  return moments;
}

}  // namespace ptk::optim
