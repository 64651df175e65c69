// A linear layer's weight repacked once for skinny products: y = x @ W^T where x has few rows (a
// decode step's busy slots) and W is wide and fixed for many calls (the LM head, 151,936 x H).
//
// Why: OpenBLAS copies W into its own panel layout on every call, whatever x's row count. For the
// LM head that is 155 MB (hidden 256) to 545 MB (hidden 896) of copying per decode step, as long as
// the multiply itself at 64 rows and nearly all of a one-row step. PackedLinear makes that copy once
// (16 output features per panel, input-feature-major) and its AVX-512 kernel streams the panels once
// per call: measured 1.2x (64 rows) to 2.7x (1 row) faster than at::mm on the LM head
// (BENCHMARKS.md). Not autograd-aware (inference only) and CPU only.
//
// Not a cache: it holds a copy made when it was built, so it is stale once W changes (the engine
// builds one per generate() call and drops it at the end).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace ptk::kernels::cpu {

class PackedLinear {
 public:
  // Whether the packed kernel can serve w here: w is a 2-D float32 CPU tensor and this CPU has
  // AVX-512F. When false, callers use at::mm as before.
  static bool supported(const at::Tensor& w);

  // Packs w (N, K): N * K * 4 bytes (N rounded up to a multiple of 48). Throws ptk::Error when
  // !supported(w).
  explicit PackedLinear(const at::Tensor& w);

  // out = x @ W^T: x (R, K) float32 on CPU, out resized in place to (R, N) (its storage is kept
  // while large enough, as forward_cached's logits buffer expects) and returned. Multithreaded over
  // output features with at::parallel_for; each output element is one float32 dot product summed
  // in k order, so a row's result does not depend on R or on the other rows.
  const at::Tensor& forward_out(const at::Tensor& x, at::Tensor& out) const;

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return k_; }
  int64_t bytes() const;

 private:
  at::Tensor panels_;  // (N / 16 rounded up to whole kernel blocks, K, 16) float32, zero past N
  int64_t n_ = 0, k_ = 0;
};

}  // namespace ptk::kernels::cpu
