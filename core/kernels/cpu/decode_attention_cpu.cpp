// decode_attention_rows: per (row, K/V head), the g query heads of the group score the row's keys
// (one pass over K, each key loaded once for the g dot products), softmax in float32, then one
// pass over V accumulating the g outputs. Parallel over (row, K/V head) pairs.
#include "core/kernels/cpu/decode_attention_cpu.h"

// GCC 12's AVX-512 intrinsics (_mm512_set1_ps, _mm512_cvtss_f32, ...) build on _mm512_undefined_ps
// and trip -Wmaybe-uninitialized when inlined here: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/kernels/cpu/avx512_math.h"
#include "core/kernels/cpu/cpu_features.h"
#include "core/util/error.h"

namespace ptk::kernels::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
using avx512::lane_sum;

// s[0, len) <- softmax(s), vectorised; the last partial vector through masks.
__attribute__((target("avx512f"))) void softmax_inplace(float* s, int64_t len) {
  const int64_t full = len / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1u);
  const __m512 inv = _mm512_set1_ps(1.0f / avx512::exp_row(s, len, nullptr).sum);
  for (int64_t t = 0; t < full; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
  if (tail) _mm512_mask_storeu_ps(s + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + full), inv));
}

// One (row, K/V head): q (g, D) rows at stride D; k, v (len, D); out (g, D). scores: g * len floats.
__attribute__((target("avx512f"))) void attend_group(const float* q, int64_t g, const float* k, const float* v,
                                                     int64_t len, int64_t D, float scale, float* scores,
                                                     float* out) {
  const int64_t nv = D / 16;
  for (int64_t t = 0; t < len; ++t) {
    const float* kt = k + t * D;
    for (int64_t i = 0; i < g; ++i) {
      const float* qi = q + i * D;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qi), _mm512_loadu_ps(kt));
      for (int64_t c = 1; c < nv; ++c)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16 * c), _mm512_loadu_ps(kt + 16 * c), acc);
      scores[i * len + t] = lane_sum(acc) * scale;
    }
  }
  for (int64_t i = 0; i < g; ++i) softmax_inplace(scores + i * len, len);
  // out_i = sum_t p_i[t] v[t], up to 4 query heads per pass over V (16 accumulators at D = 64).
  for (int64_t i0 = 0; i0 < g; i0 += 4) {
    const int64_t gi = std::min<int64_t>(4, g - i0);
    for (int64_t c = 0; c < nv; ++c) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t t = 0; t < len; ++t) {
        const __m512 vt = _mm512_loadu_ps(v + t * D + 16 * c);
        for (int64_t i = 0; i < gi; ++i)
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(i0 + i) * len + t]), vt, acc[i]);
      }
      for (int64_t i = 0; i < gi; ++i) _mm512_storeu_ps(out + (i0 + i) * D + 16 * c, acc[i]);
    }
  }
}
#endif

}  // namespace

bool decode_attention_rows_supported(const at::Tensor& q, const at::Tensor& K) {
  return cpu_has_avx512f() && q.device().is_cpu() && K.device().is_cpu() && q.scalar_type() == at::kFloat &&
         K.scalar_type() == at::kFloat && K.is_contiguous() && K.dim() == 4 && K.size(3) % 16 == 0;
}

at::Tensor decode_attention_rows(const at::Tensor& q_in, const at::Tensor& K, const at::Tensor& V,
                                 const std::vector<int64_t>& slots, const std::vector<int64_t>& lens) {
  PTK_CHECK(decode_attention_rows_supported(q_in, K) && V.is_contiguous() && V.sizes() == K.sizes(),
            "decode_attention_rows: unsupported tensors");
  const at::Tensor q = q_in.contiguous();
  const int64_t R = q.size(0), nh = q.size(1), D = q.size(2), nkv = K.size(1), T_max = K.size(2), g = nh / nkv;
  PTK_CHECK(static_cast<int64_t>(slots.size()) == R && static_cast<int64_t>(lens.size()) == R && D == K.size(3) &&
                nh % nkv == 0,
            "decode_attention_rows: shapes do not match");
  at::Tensor out = at::empty({R, nh, D}, q.options());
#if defined(__x86_64__) || defined(__i386__)
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const float* qp = q.data_ptr<float>();
  const float* kp = K.data_ptr<float>();
  const float* vp = V.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t max_len = 1;
  for (int64_t r = 0; r < R; ++r) {
    PTK_CHECK(lens[r] >= 1 && lens[r] <= T_max, "decode_attention_rows: a row's key count is outside the cache");
    max_len = std::max(max_len, lens[r]);
  }
  at::parallel_for(0, R * nkv, 1, [&](int64_t b, int64_t e) {
    std::vector<float> scores(static_cast<size_t>(g * max_len));
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / nkv, h = task % nkv;
      const int64_t base = (slots[r] * nkv + h) * T_max * D;
      attend_group(qp + (r * nh + h * g) * D, g, kp + base, vp + base, lens[r], D, scale, scores.data(),
                   op + (r * nh + h * g) * D);
    }
  });
#endif
  return out;
}

}  // namespace ptk::kernels::cpu
