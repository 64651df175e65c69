// Reference kernels: ATen ops only, so they run on any device (CPU, CUDA, the `meta` device of the
// shape tests) and any floating dtype. The exact arithmetic the cpu/ and cuda/ kernels are tested
// against (tests/kernels/kernels_test.cpp), and what a device without its own kernel runs.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace ptk::kernels::ref {

// Causal grouped-query attention, the training forward's exact path: q (N, heads, Lq, D) or
// (heads, Lq, D), k/v (N, kv_heads, Lk, D) or (kv_heads, Lk, D), heads a multiple of kv_heads,
// Lq <= Lk; the queries are the last Lq of the Lk positions (query i sees keys j <= Lk - Lq + i).
// The g query heads of a K/V head are stacked into one (g Lq, D) matrix, so QK^T and PV are one
// GEMM per K/V head (no K/V expansion); the (Lq, Lk) scores are masked, softmax in float32.
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// The same attention as the KV cache's prefill computes it (a matmul over a broadcast grouped
// view rather than causal_attention's stacked GEMM): q (heads, Lq, D), k/v (kv_heads, Lk, D).
// Kept as it was so generation's numbers do not move.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// ---- one decode step over the KV cache ---------------------------------------------------------
// Row r's single query attends to keys [0, lens[r]) of cache slot slots[r]. Two layouts, both one
// batched op per layer whatever the set of slots:
//  - window: the slots' range [lo, hi] of the cache is read in place (a view, no copy); slots of
//    that range not in the batch compute a throwaway row (their queries are zero, they see key 0).
//  - gather: the rows' K/V windows [0, max_k) are copied out with index_select (R rows, no waste).
// Each row's scores are masked past its own length.
struct DecodePlan {
  bool window = true;
  int64_t lo = 0, n = 0;  // window: slots [lo, lo + n); gather: n = R
  int64_t max_k = 0;      // keys read per row
  at::Tensor slots;       // (R) int64 on the cache's device
  at::Tensor rows;        // window: index of each row within [lo, lo + n)
  at::Tensor invisible;   // (n, max_k) bool: keys a row must not see
};
// window: true / false forces a layout; otherwise (`choose`) the window unless it holds over twice
// the rows. Host-side vectors; the plan's tensors are made on `device`.
DecodePlan plan_decode(const std::vector<int64_t>& slots, const std::vector<int64_t>& lens, int64_t max_k,
                       at::Device device, int force /* 0 choose, 1 window, 2 gather */);
// q (R, nh, D); K, V one layer's cache (S, nkv, T_max, D) with this step's keys written. (R, nh, D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& K, const at::Tensor& V, const DecodePlan& plan);

// x.index_select(0, idx), and on the `meta` device the same through gather (LibTorch has no C++
// meta kernel for index_select; gather and its backward have one). Differentiable.
at::Tensor index_rows(const at::Tensor& x, const at::Tensor& idx);

// y = x W^T + b (b may be undefined).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

}  // namespace ptk::kernels::ref
