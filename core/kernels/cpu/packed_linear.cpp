// PackedLinear: W (N, K) as panels of 16 output features, input-feature-major, and an AVX-512
// micro-kernel over them. See packed_linear.h for why.
//
// Kernel: a block of kPanels panels (48 output features) against kRows rows of x at a time keeps
// kRows x kPanels = 24 vector accumulators in registers; per input feature k it loads kPanels
// 16-wide weight vectors and broadcasts kRows scalars of x: 24 FMAs for 11 loads. A block's panels
// (48 x K floats: 48 KB at K = 256, 172 KB at K = 896) stay in L1/L2 while every row block of x
// passes over them, so W streams from memory once per call. 8 x 3 measured best of 12 x 2, 8 x 3,
// 6 x 4, 14 x 2 on a Sapphire-Rapids-class core at K = 896.
#include "core/kernels/cpu/packed_linear.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

#include "core/kernels/cpu/cpu_features.h"
#include "core/util/error.h"

namespace ptk::kernels::cpu {
namespace {

constexpr int kLanes = 16;  // floats per AVX-512 vector = output features per panel
constexpr int kRows = 8;    // rows of x per micro-kernel call
constexpr int kPanels = 3;  // panels per micro-kernel call

#if defined(__x86_64__) || defined(__i386__)
// out[i][16 j + l] = sum_k x[i][k] * panel_j[k][l] for i < MR, j < nv, l < 16 (l < last_cols in
// the last panel of the weight). The unroll pragmas keep the accumulators in registers at -O2 too
// (without them GCC -O2 spills them and the kernel runs 2-3x slower).
template <int MR>
__attribute__((target("avx512f"))) void micro(const float* x, int64_t ldx, const float* panels, int64_t K, float* out,
                                             int64_t ldo, int nv, int last_cols) {
  __m512 acc[MR][kPanels];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kPanels; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t stride = K * kLanes;  // floats from one panel to the next
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[kPanels];
#pragma GCC unroll 4
    for (int j = 0; j < kPanels; ++j) w[j] = _mm512_loadu_ps(panels + j * stride + k * kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(x[i * ldx + k]);
#pragma GCC unroll 4
      for (int j = 0; j < kPanels; ++j) acc[i][j] = _mm512_fmadd_ps(b, w[j], acc[i][j]);
    }
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << last_cols) - 1u);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nv; ++j) {
      float* o = out + i * ldo + j * kLanes;
      if (j == nv - 1 && last_cols < kLanes)
        _mm512_mask_storeu_ps(o, tail, acc[i][j]);
      else
        _mm512_storeu_ps(o, acc[i][j]);
    }
}

// micro<mr> for a runtime mr in [1, kRows] (the last row block of x).
template <int MR>
void micro_rows(int mr, const float* x, int64_t ldx, const float* panels, int64_t K, float* out, int64_t ldo, int nv,
                int last_cols) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro<MR>(x, ldx, panels, K, out, ldo, nv, last_cols);
    return micro_rows<MR - 1>(mr, x, ldx, panels, K, out, ldo, nv, last_cols);
  }
}
#endif

}  // namespace

bool PackedLinear::supported(const at::Tensor& w) {
  return cpu_has_avx512f() && w.defined() && w.dim() == 2 && w.device().is_cpu() && w.scalar_type() == at::kFloat;
}

PackedLinear::PackedLinear(const at::Tensor& w) {
  PTK_CHECK(supported(w), "PackedLinear: needs a 2-D float32 CPU weight and a CPU with AVX-512F");
  at::NoGradGuard no_grad;
  n_ = w.size(0);
  k_ = w.size(1);
  // Whole blocks of kPanels panels, zero past N: the kernel always loads kPanels panels.
  const int64_t P = ((n_ + kLanes * kPanels - 1) / (kLanes * kPanels)) * kPanels, full = n_ / kLanes,
                rem = n_ - full * kLanes;
  const at::Tensor src = w.detach().contiguous();
  panels_ = at::empty({P, k_, kLanes}, src.options());
  panels_.narrow(0, 0, full).copy_(src.narrow(0, 0, full * kLanes).view({full, kLanes, k_}).transpose(1, 2));
  if (P > full) panels_.narrow(0, full, P - full).zero_();
  if (rem > 0) panels_[full].narrow(1, 0, rem).copy_(src.narrow(0, full * kLanes, rem).t());
}

int64_t PackedLinear::bytes() const { return panels_.numel() * static_cast<int64_t>(sizeof(float)); }

const at::Tensor& PackedLinear::forward_out(const at::Tensor& x_in, at::Tensor& out) const {
  PTK_CHECK(x_in.dim() == 2 && x_in.size(1) == k_ && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
            "PackedLinear: x must be (R, " + std::to_string(k_) + ") float32 on CPU");
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0);
  if (!out.defined() || out.scalar_type() != at::kFloat || !out.device().is_cpu())
    out = at::empty({R, n_}, x.options());
  else
    out.resize_({R, n_});
  PTK_CHECK(out.is_contiguous(), "PackedLinear: out must be contiguous");
#if defined(__x86_64__) || defined(__i386__)
  const float* xp = x.data_ptr<float>();
  const float* wp = panels_.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t P = (n_ + kLanes - 1) / kLanes, K = k_, N = n_;  // panels holding outputs
  const int64_t blocks = (P + kPanels - 1) / kPanels;
  // Each block is R x 48 outputs of 2 R K FLOPs; at least ~1 MFLOP per task.
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, 2 * R * K * kPanels * kLanes));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * kPanels;
      const int nv = static_cast<int>(std::min<int64_t>(kPanels, P - p0));
      const int64_t col0 = p0 * kLanes;
      const int last_cols = static_cast<int>(std::min<int64_t>(kLanes, N - (p0 + nv - 1) * kLanes));
      for (int64_t r = 0; r < R; r += kRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kRows, R - r));
        micro_rows<kRows>(mr, xp + r * K, K, wp + p0 * K * kLanes, K, op + r * N + col0, N, nv, last_cols);
      }
    }
  });
#endif
  return out;
}

}  // namespace ptk::kernels::cpu
