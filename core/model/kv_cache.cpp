// KVCache storage and slot bookkeeping. Not attention (Qwen2Model::forward_cached).
#include "core/model/kv_cache.h"

#include <torch/torch.h>

#include "core/util/error.h"

namespace ptk::model {

KVCache::KVCache(const checkpoint::Qwen2Config& c, int64_t slots, int64_t max_len, at::ScalarType dtype,
                 at::Device device)
    : lengths_(static_cast<size_t>(slots), 0), max_len_(max_len), layers_(c.num_hidden_layers) {
  PTK_CHECK(slots > 0 && max_len > 0, "KVCache needs slots > 0 and max_len > 0 (got " + std::to_string(slots) + ", " +
                                          std::to_string(max_len) + ")");
  storage_ = at::zeros({c.num_hidden_layers, 2, slots, c.num_key_value_heads, max_len, c.head_dim},
                       at::TensorOptions().dtype(dtype).device(device));
}

void KVCache::check_slot(int64_t slot, const char* what) const {
  PTK_CHECK(slot >= 0 && slot < slots(), std::string("KVCache::") + what + ": slot " + std::to_string(slot) +
                                             " out of range [0, " + std::to_string(slots()) + ")");
}

int64_t KVCache::length(int64_t slot) const {
  check_slot(slot, "length");
  return lengths_[slot];
}

void KVCache::reset(int64_t slot) {
  check_slot(slot, "reset");
  lengths_[slot] = 0;
}

void KVCache::set_length(int64_t slot, int64_t length) {
  check_slot(slot, "set_length");
  PTK_CHECK(length >= 0 && length <= max_len_, "KVCache::set_length: " + std::to_string(length) +
                                                   " outside [0, max_len " + std::to_string(max_len_) + "]");
  lengths_[slot] = length;
}

void KVCache::copy_slot(int64_t src, const std::vector<int64_t>& dsts) {
  check_slot(src, "copy_slot");
  at::NoGradGuard no_grad;
  const int64_t n = lengths_[src];
  if (dsts.empty()) return;
  std::vector<int64_t> d;
  for (int64_t s : dsts) {
    check_slot(s, "copy_slot");
    if (s != src) d.push_back(s);
  }
  if (!d.empty() && n > 0) {
    // (L, 2, kv, n, D) broadcast into every destination at once.
    auto idx = at::tensor(d, at::kLong).to(storage_.device());
    auto prefix = storage_.select(2, src).narrow(3, 0, n).unsqueeze(2);  // (L, 2, 1, kv, n, D)
    auto target = storage_.narrow(4, 0, n);                               // (L, 2, S, kv, n, D)
    target.index_copy_(2, idx, prefix.expand({prefix.size(0), 2, static_cast<int64_t>(d.size()), prefix.size(3), n,
                                              prefix.size(5)}).contiguous());
  }
  for (int64_t s : d) lengths_[s] = n;
}

at::Tensor KVCache::keys(int64_t layer) const { return storage_[layer][0]; }
at::Tensor KVCache::values(int64_t layer) const { return storage_[layer][1]; }

size_t KVCache::bytes() const { return static_cast<size_t>(storage_.numel()) * storage_.element_size(); }

}  // namespace ptk::model
