// KV cache for the rollout engine: one preallocated tensor [layers, 2, S, kv_heads, T_max, D] with
// a length per slot; a prompt's KV prefilled once can be copied into G other slots.
// Not a scheduler: which sequence sits in which slot is the rollout engine's business.
//
// Threading and ownership: a KVCache owns its storage; it is not thread-safe. One thread drives
// Qwen2Model::forward_cached on it at a time. Copying a KVCache is not allowed (it can be tens of
// GiB); copy_slot is the explicit, per-slot copy.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "core/checkpoint/hf_config.h"  // Qwen2Config

namespace ptk::model {

class KVCache {
 public:
  // Allocates (zeroed) storage for `slots` sequences of up to `max_len` tokens each.
  KVCache(const checkpoint::Qwen2Config& config, int64_t slots, int64_t max_len, at::ScalarType dtype,
          at::Device device);
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  KVCache(KVCache&&) = default;
  KVCache& operator=(KVCache&&) = default;

  int64_t slots() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t max_len() const { return max_len_; }
  int64_t num_layers() const { return layers_; }
  int64_t length(int64_t slot) const;
  const std::vector<int64_t>& lengths() const { return lengths_; }

  // Empties a slot (its storage is overwritten by the next prefill).
  void reset(int64_t slot);
  // Copies slot `src`'s first length(src) positions (every layer, K and V) into each of `dsts`
  // and sets their lengths: the shared prompt is prefilled once for its G samples.
  void copy_slot(int64_t src, const std::vector<int64_t>& dsts);
  // Sets a slot's length (rollback after speculative tokens; must be <= max_len).
  void set_length(int64_t slot, int64_t length);

  // Views into the storage: (S, kv_heads, T_max, D).
  at::Tensor keys(int64_t layer) const;
  at::Tensor values(int64_t layer) const;
  // The whole storage (L, 2, S, kv_heads, T_max, D).
  const at::Tensor& storage() const { return storage_; }
  // Bytes the storage takes.
  size_t bytes() const;

 private:
  void check_slot(int64_t slot, const char* what) const;
  at::Tensor storage_;
  std::vector<int64_t> lengths_;
  int64_t max_len_ = 0;
  int64_t layers_ = 0;
};

}  // namespace ptk::model
