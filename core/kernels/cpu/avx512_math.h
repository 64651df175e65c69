// AVX-512 helpers shared by ptk's CPU kernels (decode attention, flash attention, the lm_head op's
// row passes).
// Internal: include only from .cpp files that call them inside target("avx512f") functions, after
// checking cpu_has_avx512f() (core/kernels/cpu/cpu_features.h) at run time.
#pragma once
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>
#include <limits>

namespace ptk::kernels::cpu::avx512 {

// The sum of a vector's 16 lanes (GCC 12's _mm512_reduce_add_ps trips -Wmaybe-uninitialized).
__attribute__((target("avx512f"))) inline float lane_sum(__m512 x) {
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // + the other 256-bit half
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));  // + the neighbouring 128-bit lane
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));        // + the other 64-bit pair
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));        // + the neighbouring float
  return _mm512_cvtss_f32(x);
}

// exp(x) for x <= 0 (softmax arguments after the max is subtracted), 16 lanes: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7 on that range),
// times 2^n by scalef. Arguments below -87 give 0 or a denormal, as expf does.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);    // x - n ln2 (high part)
  const __m512 rr = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);  // (low part)
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, rr, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// x[0, len) <- exp(x - m), with m the max of x[0, len), or *shift where given (probabilities from
// a known log-sum-exp); the last partial vector through masks. Returns the exponentials' sum and m.
struct ExpRow {
  float sum, shift;
};
__attribute__((target("avx512f"))) inline ExpRow exp_row(float* x, int64_t len, const float* shift) {
  const int64_t full = len / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1u);
  float m = 0;
  if (shift) {
    m = *shift;
  } else {
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 mv = ninf;
    for (int64_t t = 0; t < full; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + t));
    if (tail) mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(ninf, tail, x + full));
    m = _mm512_reduce_max_ps(mv);
  }
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < full; t += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + t), mv));
    _mm512_storeu_ps(x + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 x_t = _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + full), mv);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(x_t));
    _mm512_mask_storeu_ps(x + full, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  return {lane_sum(sum), m};
}

}  // namespace ptk::kernels::cpu::avx512
#endif
