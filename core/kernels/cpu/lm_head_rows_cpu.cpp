#include "core/kernels/cpu/lm_head_rows_cpu.h"

// GCC 12's AVX-512 intrinsics trip -Wmaybe-uninitialized when inlined (see decode_attention_cpu.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/kernels/cpu/avx512_math.h"
#include "core/kernels/cpu/cpu_features.h"
#include "core/util/error.h"

namespace ptk::kernels::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
using avx512::exp_nonpositive;
using avx512::lane_sum;

struct RowStats {
  float lse, ent;
  int64_t argmax;
};

// Two passes over one row: the max and its first index, then sum exp(z - m) and sum exp(z - m) z
// (four accumulators each, for the add latency and a shorter rounding chain).
__attribute__((target("avx512f"))) RowStats row_stats(const float* z, int64_t V) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t full = V / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (V - full)) - 1u);
  __m512 vmax = _mm512_set1_ps(ninf);
  __m512i vidx = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t j = 0; j < full; j += 16) {
    const __m512 x = _mm512_loadu_ps(z + j);
    const __mmask16 gt = _mm512_cmp_ps_mask(x, vmax, _CMP_GT_OQ);  // strictly greater: keeps each lane's first
    vmax = _mm512_mask_mov_ps(vmax, gt, x);
    vidx = _mm512_mask_mov_epi32(vidx, gt, idx);
    idx = _mm512_add_epi32(idx, step);
  }
  if (tail) {
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(ninf), tail, z + full);
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(tail, x, vmax, _CMP_GT_OQ);
    vmax = _mm512_mask_mov_ps(vmax, gt, x);
    vidx = _mm512_mask_mov_epi32(vidx, gt, idx);
  }
  alignas(64) float mx[16];
  alignas(64) int32_t ix[16];
  _mm512_store_ps(mx, vmax);
  _mm512_store_si512(reinterpret_cast<__m512i*>(ix), vidx);
  float m = mx[0];
  int64_t arg = ix[0];
  for (int l = 1; l < 16; ++l) {
    if (mx[l] > m || (mx[l] == m && ix[l] < arg)) m = mx[l], arg = ix[l];
  }
  const __m512 vm = _mm512_set1_ps(m);
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 w[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= full; j += 64) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 x = _mm512_loadu_ps(z + j + 16 * u);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(x, vm));
      s[u] = _mm512_add_ps(s[u], e);
      w[u] = _mm512_fmadd_ps(e, x, w[u]);
    }
  }
  for (; j < full; j += 16) {
    const __m512 x = _mm512_loadu_ps(z + j);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(x, vm));
    s[0] = _mm512_add_ps(s[0], e);
    w[0] = _mm512_fmadd_ps(e, x, w[0]);
  }
  if (tail) {
    const __m512 x = _mm512_maskz_loadu_ps(tail, z + full);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(x, vm)));
    s[0] = _mm512_add_ps(s[0], e);
    w[0] = _mm512_fmadd_ps(e, x, w[0]);
  }
  const double sum = static_cast<double>(lane_sum(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))));
  const double wsum =
      static_cast<double>(lane_sum(_mm512_add_ps(_mm512_add_ps(w[0], w[1]), _mm512_add_ps(w[2], w[3]))));
  const double lse = m + std::log(sum);
  return {static_cast<float>(lse), static_cast<float>(lse - wsum / sum), arg};
}

// z <- scale g (onehot(t) - exp(z - lse)) over one row.
__attribute__((target("avx512f"))) void row_logp_grad(float* z, int64_t V, int64_t t, float lse, float g,
                                                      float scale) {
  const int64_t full = V / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (V - full)) - 1u);
  const __m512 vl = _mm512_set1_ps(lse), k = _mm512_set1_ps(-scale * g);
  for (int64_t j = 0; j < full; j += 16)
    _mm512_storeu_ps(z + j, _mm512_mul_ps(k, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(z + j), vl))));
  if (tail) {
    const __m512 x = _mm512_maskz_loadu_ps(tail, z + full);
    _mm512_mask_storeu_ps(z + full, tail, _mm512_mul_ps(k, exp_nonpositive(_mm512_sub_ps(x, vl))));
  }
  z[t] += scale * g;
}
#endif

void check_rows(const at::Tensor& z, const at::Tensor& targets, const at::Tensor& v, const char* what) {
  PTK_CHECK(lm_head_rows_supported(z), std::string(what) + ": z must be CPU float32 contiguous (rows, V) on AVX-512");
  PTK_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == z.size(0),
            std::string(what) + ": targets must be int64 contiguous (rows)");
  PTK_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.numel() == z.size(0),
            std::string(what) + ": per-row tensors must be float32 contiguous (rows)");
}

}  // namespace

bool lm_head_rows_supported(const at::Tensor& z) {
#if defined(__x86_64__) || defined(__i386__)
  return z.defined() && z.device().is_cpu() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous() &&
         z.size(1) > 0 && z.size(1) < (int64_t{1} << 31) && cpu_has_avx512f();
#else
  (void)z;
  return false;
#endif
}

void lm_head_row_stats(const at::Tensor& z, const at::Tensor& targets, at::Tensor lse, at::Tensor logp,
                       at::Tensor ent, at::Tensor correct) {
  check_rows(z, targets, lse, "lm_head_row_stats");
  check_rows(z, targets, logp, "lm_head_row_stats");
  check_rows(z, targets, ent, "lm_head_row_stats");
  PTK_CHECK(correct.scalar_type() == at::kBool && correct.is_contiguous() && correct.numel() == z.size(0),
            "lm_head_row_stats: correct must be bool contiguous (rows)");
#if defined(__x86_64__) || defined(__i386__)
  const int64_t V = z.size(1);
  const float* zp = z.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float *lp = lse.data_ptr<float>(), *op = logp.data_ptr<float>(), *ep = ent.data_ptr<float>();
  bool* cp = correct.data_ptr<bool>();
  at::parallel_for(0, z.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = zp + r * V;
      const RowStats st = row_stats(row, V);
      lp[r] = st.lse;
      ep[r] = st.ent;
      op[r] = row[tp[r]] - st.lse;
      cp[r] = st.argmax == tp[r];
    }
  });
#endif
}

void lm_head_logp_grad_inplace(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& g,
                               double scale) {
  check_rows(z, targets, lse, "lm_head_logp_grad_inplace");
  check_rows(z, targets, g, "lm_head_logp_grad_inplace");
#if defined(__x86_64__) || defined(__i386__)
  const int64_t V = z.size(1);
  float* zp = z.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float *lp = lse.data_ptr<float>(), *gp = g.data_ptr<float>();
  at::parallel_for(0, z.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) row_logp_grad(zp + r * V, V, tp[r], lp[r], gp[r], static_cast<float>(scale));
  });
#endif
}

}  // namespace ptk::kernels::cpu
