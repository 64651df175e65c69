// One decode step's attention on CPU without padding: row r's query heads attend to exactly the
// base[r] + 1 keys of its own slot, read in place from the KV cache. The batched layouts of
// forward_cached (window / gather) read every row's keys up to the longest context in the batch;
// with continuous batching contexts differ by hundreds of tokens, so at 256 slots most of the K/V
// they read is padding (rollout_bench --decode-attention compares them). Internal to core/model.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace ptk::kernels::cpu {

// Whether decode_attention_rows can serve this step: float32 CPU tensors, a contiguous cache,
// head_dim a multiple of 16, AVX-512F.
bool decode_attention_rows_supported(const at::Tensor& q, const at::Tensor& K);

// q (R, nh, D); K, V one layer's cache (S, nkv, T_max, D) with this step's keys already written;
// row r reads slot slots[r], keys [0, lens[r]). Grouped-query: query head j uses K/V head
// j / (nh / nkv). Returns (R, nh, D) = softmax(q K^T / sqrt(D)) V per row and head. A row's result
// does not depend on the other rows.
at::Tensor decode_attention_rows(const at::Tensor& q, const at::Tensor& K, const at::Tensor& V,
                                 const std::vector<int64_t>& slots, const std::vector<int64_t>& lens);

}  // namespace ptk::kernels::cpu
