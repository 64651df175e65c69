#include "core/kernels/cpu/flash_attention_cpu.h"

// GCC 12's AVX-512 intrinsics build on _mm512_undefined_ps and trip -Wmaybe-uninitialized when
// inlined here: a known false positive (as in decode_attention_cpu.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/kernels/cpu/cpu_features.h"
#include "core/util/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "core/kernels/cpu/avx512_math.h"
#endif

namespace ptk::kernels::cpu {
namespace {

constexpr int64_t kMr = 6;      // accumulator rows of the micro-kernel
constexpr int64_t kPanel = 64;  // accumulator columns (4 vectors of 16)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shape every routine below shares.
struct Dims {
  int64_t H, rows, lk, d, g, off, block, nblk, ld;  // ld: row stride of the score buffers
  // Keys row r sees: [0, lim(r)).
  int64_t lim(int64_t r) const { return r / g + off + 1; }
};

Dims dims_of(const at::Tensor& qs, const at::Tensor& k, int64_t g, int64_t block_rows) {
  Dims s{};
  s.H = qs.size(0);
  s.rows = qs.size(1);
  s.lk = k.size(1);
  s.d = qs.size(2);
  s.g = g;
  s.off = s.lk - s.rows / g;
  s.block = ceil_div(std::max<int64_t>(block_rows, 1), kMr) * kMr;
  s.nblk = ceil_div(s.rows, s.block);
  s.ld = ceil_div(s.lk, kPanel) * kPanel;
  return s;
}

// Runs work(worker, h, r0) for every (head, block of rows) on the intra-op threads. Blocks go
// largest first (the last, which see the most keys), dealt round-robin: worker w takes items w,
// w + workers, ..., so the causal triangle's uneven blocks spread evenly and each worker's dK / dV
// sums run in a fixed order — gradients are the same bits from run to run at a given thread count
// (a shared counter balanced as well but made the sums depend on timing).
template <typename F>
void for_each_block(const Dims& s, int64_t workers, F&& work) {
  const int64_t items = s.H * s.nblk;
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w)
      for (int64_t it = w; it < items; it += workers) work(w, it % s.H, (s.nblk - 1 - it / s.H) * s.block);
  });
}

// Workers for a call: the intra-op threads, no more than there are blocks (each backward worker
// zeroes and sums its own dK / dV).
int64_t worker_count(const Dims& s) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(threads, s.H * s.nblk));
}

// (H, Lk, D) -> (H, Lk / 64 panels, D, 64): each panel the transpose of 64 keys, zero-padded, so a
// score tile reads its B operand at a 256-byte stride instead of the Lk-float stride of K^T.
at::Tensor panels_of(const at::Tensor& k, const Dims& s) {
  at::Tensor padded = at::zeros({s.H, s.ld, s.d}, k.options());
  padded.narrow(1, 0, s.lk).copy_(k);
  return padded.view({s.H, s.ld / kPanel, kPanel, s.d}).transpose(2, 3).contiguous();
}

#if defined(__x86_64__) || defined(__i386__)
// C[i, 0:w] = (or += when ACC) sum_{p < depth} A[i ai + p ap] B[p ldb + 0:w] for i < MR, with
// w = 16 (NV - 1) + popcount(last): MR x NV vectors of accumulators, one broadcast of A per row and
// NV loads of B per step of p.
template <int MR, int NV, bool ACC>
__attribute__((target("avx512f"))) void micro(const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb,
                                              int64_t depth, float* C, int64_t ldc, __mmask16 last) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (!ACC)
        c[i][j] = _mm512_setzero_ps();
      else if (j == NV - 1)
        c[i][j] = _mm512_maskz_loadu_ps(last, C + i * ldc + 16 * j);
      else
        c[i][j] = _mm512_loadu_ps(C + i * ldc + 16 * j);
    }
  for (int64_t p = 0; p < depth; ++p) {
    const float* b = B + p * ldb;
    const float* a = A + p * ap;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      bv[j] = j == NV - 1 ? _mm512_maskz_loadu_ps(last, b + 16 * j) : _mm512_loadu_ps(b + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * ai]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = _mm512_fmadd_ps(av, bv[j], c[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (j == NV - 1)
        _mm512_mask_storeu_ps(C + i * ldc + 16 * j, last, c[i][j]);
      else
        _mm512_storeu_ps(C + i * ldc + 16 * j, c[i][j]);
    }
}

using MicroFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, __mmask16);

template <bool ACC, int MR>
constexpr MicroFn micro_row(int nv) {
  return nv == 1   ? &micro<MR, 1, ACC>
         : nv == 2 ? &micro<MR, 2, ACC>
         : nv == 3 ? &micro<MR, 3, ACC>
                   : &micro<MR, 4, ACC>;
}

// One micro-kernel call over mr <= 6 rows and w <= 64 columns.
template <bool ACC>
void tile(int64_t mr, int64_t w, const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb, int64_t depth,
          float* C, int64_t ldc) {
  const int nv = static_cast<int>(ceil_div(w, 16));
  const __mmask16 last = static_cast<__mmask16>(0xFFFFu >> (16 * nv - w));
  MicroFn fn = nullptr;
  switch (mr) {
    case 1: fn = micro_row<ACC, 1>(nv); break;
    case 2: fn = micro_row<ACC, 2>(nv); break;
    case 3: fn = micro_row<ACC, 3>(nv); break;
    case 4: fn = micro_row<ACC, 4>(nv); break;
    case 5: fn = micro_row<ACC, 5>(nv); break;
    default: fn = micro_row<ACC, 6>(nv); break;
  }
  fn(A, ai, ap, B, ldb, depth, C, ldc, last);
}

// out (rows_b x ld) = A (rows_b x D, rows at stride D) times the panels' keys, each group of 6 rows
// only up to the keys its last row sees (the rest of its columns is left unwritten).
void scores_tile(const Dims& s, int64_t r0, int64_t rows_b, const float* A, const float* panels, float* out) {
  const int64_t kend = s.lim(r0 + rows_b - 1);
  for (int64_t p0 = 0; p0 < kend; p0 += kPanel) {
    const float* B = panels + (p0 / kPanel) * s.d * kPanel;
    for (int64_t i0 = 0; i0 < rows_b; i0 += kMr) {
      const int64_t mr = std::min(kMr, rows_b - i0), lim = s.lim(r0 + i0 + mr - 1);
      if (p0 >= lim) continue;
      tile<false>(mr, std::min(kPanel, lim - p0), A + i0 * s.d, s.d, 1, B, kPanel, s.d, out + i0 * s.ld + p0, s.ld);
    }
  }
}

// C (rows_b x D) = P (rows_b x keys, stride ld) times M (keys x D): each group of 6 rows over the
// keys its last row sees (P is zero beyond a row's own keys).
void rows_times(const Dims& s, int64_t r0, int64_t rows_b, const float* P, const float* M, float* C) {
  for (int64_t i0 = 0; i0 < rows_b; i0 += kMr) {
    const int64_t mr = std::min(kMr, rows_b - i0), lim = s.lim(r0 + i0 + mr - 1);
    for (int64_t c0 = 0; c0 < s.d; c0 += kPanel)
      tile<false>(mr, std::min(kPanel, s.d - c0), P + i0 * s.ld, s.ld, 1, M + c0, s.d, lim, C + i0 * s.d + c0, s.d);
  }
}

// C (keys [0, kend) x D) += P^T (keys x rows_b) times M (rows_b x D, stride D), each group of 6 keys
// from the first row that sees any of them.
void keys_accumulate(const Dims& s, int64_t r0, int64_t rows_b, const float* P, const float* M, float* C) {
  const int64_t kend = s.lim(r0 + rows_b - 1);
  for (int64_t j0 = 0; j0 < kend; j0 += kMr) {
    const int64_t mr = std::min(kMr, kend - j0);
    const int64_t first = std::clamp((j0 - s.off) * s.g - r0, int64_t{0}, rows_b);
    for (int64_t c0 = 0; c0 < s.d; c0 += kPanel)
      tile<true>(mr, std::min(kPanel, s.d - c0), P + first * s.ld + j0, 1, s.ld, M + first * s.d + c0, s.d,
                 rows_b - first, C + j0 * s.d + c0, s.d);
  }
}

// ds[0, lim) <- p (ds - delta); ds[lim, end) <- 0.
__attribute__((target("avx512f"))) void softmax_grad_row(const float* p, float* ds, int64_t lim, int64_t end,
                                                         float delta) {
  const int64_t full = lim / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (lim - full)) - 1u);
  const __m512 dv = _mm512_set1_ps(delta);
  for (int64_t t = 0; t < full; t += 16)
    _mm512_storeu_ps(ds + t, _mm512_mul_ps(_mm512_loadu_ps(p + t), _mm512_sub_ps(_mm512_loadu_ps(ds + t), dv)));
  if (tail)
    _mm512_mask_storeu_ps(ds + full, tail,
                          _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p + full),
                                        _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, ds + full), dv)));
  std::fill(ds + lim, ds + end, 0.0f);
}
#endif

}  // namespace

bool flash_attention_cpu_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512f() && q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
         q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
         q.size(-1) % 16 == 0;
#else
  (void)q, (void)k, (void)v;
  return false;
#endif
}

void flash_attention_forward(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v, int64_t g,
                             int64_t block_rows, at::Tensor& out, at::Tensor& lse) {
  PTK_CHECK(flash_attention_cpu_supported(qs, k, v) && qs.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
            "flash_attention_forward: unsupported tensors");
  const Dims s = dims_of(qs, k, g, block_rows);
  out = at::empty_like(qs);
  lse = at::empty({s.H, s.rows}, qs.options());
#if defined(__x86_64__) || defined(__i386__)
  const at::Tensor kt = panels_of(k, s);
  const float *qp = qs.data_ptr<float>(), *ktp = kt.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const int64_t workers = worker_count(s);
  std::vector<std::vector<float>> scores(static_cast<size_t>(workers));
  for_each_block(s, workers, [&](int64_t w, int64_t h, int64_t r0) {
    std::vector<float>& buf = scores[static_cast<size_t>(w)];
    buf.resize(static_cast<size_t>(s.block * s.ld + s.block));  // scores, then each row's 1 / sum
    float* invp = buf.data() + s.block * s.ld;
    const int64_t rows_b = std::min(s.block, s.rows - r0), kend = s.lim(r0 + rows_b - 1);
    const int64_t base = h * s.rows + r0;
    scores_tile(s, r0, rows_b, qp + base * s.d, ktp + h * s.ld * s.d, buf.data());
    for (int64_t i = 0; i < rows_b; ++i) {
      float* row = buf.data() + i * s.ld;
      const int64_t lim = s.lim(r0 + i);
      const avx512::ExpRow e = avx512::exp_row(row, lim, nullptr);
      std::fill(row + lim, row + kend, 0.0f);  // the keys row i does not see
      lp[base + i] = e.shift + std::log(e.sum);
      invp[i] = 1.0f / e.sum;
    }
    float* o = op + base * s.d;
    rows_times(s, r0, rows_b, buf.data(), vp + h * s.lk * s.d, o);
    for (int64_t i = 0; i < rows_b; ++i)
      for (int64_t c = 0; c < s.d; ++c) o[i * s.d + c] *= invp[i];
  });
#endif
}

void flash_attention_backward(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                              const at::Tensor& lse, const at::Tensor& delta, int64_t g, int64_t block_rows,
                              at::Tensor& dqs, at::Tensor& dk, at::Tensor& dv) {
  PTK_CHECK(flash_attention_cpu_supported(qs, k, v) && qs.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                dout.is_contiguous() && lse.is_contiguous() && delta.is_contiguous() && dout.sizes() == qs.sizes(),
            "flash_attention_backward: unsupported tensors");
  const Dims s = dims_of(qs, k, g, block_rows);
  dqs = at::empty_like(qs);
#if defined(__x86_64__) || defined(__i386__)
  const at::Tensor kt = panels_of(k, s), vt = panels_of(v, s);
  const int64_t workers = worker_count(s);
  // Each worker accumulates its own dK and dV (blocks of different rows share keys); summed after.
  at::Tensor dk_w = at::zeros({workers, s.H, s.lk, s.d}, k.options()), dv_w = at::zeros_like(dk_w);
  const float *qp = qs.data_ptr<float>(), *kp = k.data_ptr<float>(), *ktp = kt.data_ptr<float>(),
              *vtp = vt.data_ptr<float>(), *dop = dout.data_ptr<float>(), *lp = lse.data_ptr<float>(),
              *dlp = delta.data_ptr<float>();
  float *dqp = dqs.data_ptr<float>(), *dkp = dk_w.data_ptr<float>(), *dvp = dv_w.data_ptr<float>();
  std::vector<std::vector<float>> bufs(static_cast<size_t>(workers));
  for_each_block(s, workers, [&](int64_t w, int64_t h, int64_t r0) {
    std::vector<float>& buf = bufs[static_cast<size_t>(w)];
    buf.resize(static_cast<size_t>(2 * s.block * s.ld));
    float *p = buf.data(), *ds = buf.data() + s.block * s.ld;
    const int64_t rows_b = std::min(s.block, s.rows - r0), kend = s.lim(r0 + rows_b - 1);
    const int64_t base = h * s.rows + r0;
    const float *q_b = qp + base * s.d, *do_b = dop + base * s.d;
    scores_tile(s, r0, rows_b, q_b, ktp + h * s.ld * s.d, p);
    scores_tile(s, r0, rows_b, do_b, vtp + h * s.ld * s.d, ds);  // dP = dO V^T
    for (int64_t i = 0; i < rows_b; ++i) {
      float* p_row = p + i * s.ld;
      const int64_t lim = s.lim(r0 + i);
      avx512::exp_row(p_row, lim, lp + base + i);  // P = exp(S - lse)
      std::fill(p_row + lim, p_row + kend, 0.0f);
      softmax_grad_row(p_row, ds + i * s.ld, lim, kend, dlp[base + i]);
    }
    const int64_t kv_base = (w * s.H + h) * s.lk * s.d;
    keys_accumulate(s, r0, rows_b, p, do_b, dvp + kv_base);   // dV += P^T dO
    rows_times(s, r0, rows_b, ds, kp + h * s.lk * s.d, dqp + base * s.d);  // dQ = dS K
    keys_accumulate(s, r0, rows_b, ds, q_b, dkp + kv_base);   // dK += dS^T Q
  });
  dk = workers == 1 ? dk_w[0] : dk_w.sum(0);
  dv = workers == 1 ? dv_w[0] : dv_w.sum(0);
#endif
}

}  // namespace ptk::kernels::cpu
