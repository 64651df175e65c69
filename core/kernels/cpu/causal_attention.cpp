#include "core/kernels/cpu/causal_attention.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/kernels/cpu/flash_attention_cpu.h"
#include "core/util/error.h"

namespace ptk::kernels::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Layout: the g query heads of a K/V head are interleaved by position, (N kv, Lq g, D) with row
// t g + j = query head j at position t, so a block of positions is a contiguous block of rows and
// each block's QK^T / PV is one GEMM per K/V head over the keys it can see.
// (N, kv g, Lq, D) -> those (N kv, Lq g, D) rows.
at::Tensor to_group_rows(const at::Tensor& x, int64_t kv, int64_t g) {
  const int64_t n = x.size(0), lq = x.size(2), d = x.size(3);
  return x.reshape({n, kv, g, lq, d}).transpose(2, 3).reshape({n * kv, lq * g, d});
}

// The inverse: (N kv, Lq g, D) rows -> (N, kv g, Lq, D) as a view of (N, Lq, kv g, D) memory, so the
// caller's transpose(1, 2) + reshape to (N, Lq, heads D) for o_proj is free.
at::Tensor from_group_rows(const at::Tensor& rows, int64_t n, int64_t kv, int64_t g) {
  const int64_t lq = rows.size(1) / g, d = rows.size(2);
  return rows.view({n, kv, lq, g, d}).permute({0, 2, 1, 3, 4}).reshape({n, lq, kv * g, d}).transpose(1, 2);
}

struct CausalBlockAttention : public torch::autograd::Function<CausalBlockAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            int64_t block) {
    const int64_t n = q.size(0), heads = q.size(1), lq = q.size(2), d = q.size(3), kv = k.size(1), lk = k.size(2);
    const int64_t g = heads / kv, off = lk - lq;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    at::Tensor qs = to_group_rows(q * scale, kv, g);
    at::Tensor kk = k.reshape({n * kv, lk, d}).contiguous(), vv = v.reshape({n * kv, lk, d}).contiguous();
    at::Tensor out = at::empty({n * kv, lq * g, d}, q.options());
    std::vector<at::Tensor> saved{qs, kk, vv, out};
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < lq; s += block) {
      const int64_t e = std::min(lq, s + block), rows = (e - s) * g, kend = e + off;
      at::Tensor scores = at::bmm(qs.narrow(1, s * g, rows), kk.narrow(1, 0, kend).transpose(1, 2));  // (N kv, rows, kend)
      // Only keys [s + off, kend) can be in a query's future: query t (s <= t < e) hides key j > t + off.
      const int64_t b = e - s;
      at::Tensor tri = at::full({b, b}, neg_inf, q.options()).triu(1).unsqueeze(1);  // (b, 1, b): -inf where j > t
      scores.view({n * kv, b, g, kend}).narrow(3, s + off, b).add_(tri);
      at::Tensor p = at::softmax(scores, -1);
      at::Tensor out_b = out.narrow(1, s * g, rows);
      at::bmm_out(out_b, p, vv.narrow(1, 0, kend));
      saved.push_back(p);
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["block"] = block;
    ctx->saved_data["shape"] = std::vector<int64_t>{n, heads, lq, d, kv, lk};
    return from_group_rows(out, n, kv, g);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor qs = saved[0], kk = saved[1], vv = saved[2], out = saved[3];
    const int64_t block = ctx->saved_data["block"].toInt();
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const int64_t n = shape[0], heads = shape[1], lq = shape[2], d = shape[3], kv = shape[4], lk = shape[5];
    const int64_t g = heads / kv, off = lk - lq;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    at::Tensor dout = to_group_rows(grads[0], kv, g);
    // softmax backward: dS = P (dP - rowsum(dP P)), and rowsum(dP P) = rowsum(dO O) per query row.
    at::Tensor delta = (dout * out).sum(-1, /*keepdim=*/true);  // (N kv, Lq g, 1)
    at::Tensor dqs = at::empty_like(qs);
    at::Tensor dk = at::zeros_like(kk), dv = at::zeros_like(vv);
    for (int64_t s = 0, i = 4; s < lq; s += block, ++i) {
      const int64_t e = std::min(lq, s + block), rows = (e - s) * g, kend = e + off;
      const at::Tensor& p = saved[i];  // (N kv, rows, kend)
      at::Tensor dout_b = dout.narrow(1, s * g, rows);
      at::Tensor dv_b = dv.narrow(1, 0, kend), dk_b = dk.narrow(1, 0, kend);
      dv_b.baddbmm_(p.transpose(1, 2), dout_b);
      at::Tensor ds = at::bmm(dout_b, vv.narrow(1, 0, kend).transpose(1, 2));  // dP, then dS in place
      ds.sub_(delta.narrow(1, s * g, rows)).mul_(p);
      at::Tensor dq_b = dqs.narrow(1, s * g, rows);
      at::bmm_out(dq_b, ds, kk.narrow(1, 0, kend));
      dk_b.baddbmm_(ds.transpose(1, 2), qs.narrow(1, s * g, rows));
    }
    at::Tensor dq = from_group_rows(dqs.mul_(scale), n, kv, g);
    return {dq, dk.view({n, kv, lk, d}), dv.view({n, kv, lk, d}), at::Tensor()};
  }
};

// The same attention on the AVX-512 flash kernels (flash_attention_cpu.h): saves q, k, v, its
// output and one log-sum-exp per query row; backward recomputes each block's probabilities.
struct FlashCausalAttention : public torch::autograd::Function<FlashCausalAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            int64_t block) {
    const int64_t n = q.size(0), heads = q.size(1), lq = q.size(2), d = q.size(3), kv = k.size(1), lk = k.size(2);
    const int64_t g = heads / kv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    at::Tensor qs = to_group_rows(q * scale, kv, g).contiguous();
    at::Tensor kk = k.reshape({n * kv, lk, d}).contiguous(), vv = v.reshape({n * kv, lk, d}).contiguous();
    at::Tensor out, lse;
    flash_attention_forward(qs, kk, vv, g, block, out, lse);
    at::Tensor result = from_group_rows(out, n, kv, g);
    // The returned tensor, not `out`: from_group_rows copied it, o_proj keeps that copy alive anyway, and
    // saving `out` too would hold the attention output twice per layer until backward.
    ctx->save_for_backward({qs, kk, vv, result, lse});
    ctx->saved_data["block"] = block;
    ctx->saved_data["shape"] = std::vector<int64_t>{n, heads, lq, d, kv, lk};
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor qs = saved[0], kk = saved[1], vv = saved[2], result = saved[3], lse = saved[4];
    const int64_t block = ctx->saved_data["block"].toInt();
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const int64_t n = shape[0], heads = shape[1], d = shape[3], kv = shape[4], lk = shape[5];
    const int64_t g = heads / kv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    at::Tensor dout = to_group_rows(grads[0], kv, g).contiguous();
    // rowsum(dO O) = rowsum(dP P) per query row, in the kernel's (N kv, Lq g) row order.
    at::Tensor delta = to_group_rows((grads[0] * result).sum(-1, /*keepdim=*/true), kv, g).squeeze(-1).contiguous();
    at::Tensor dqs, dk, dv;
    flash_attention_backward(qs, kk, vv, dout, lse, delta, g, block, dqs, dk, dv);
    at::Tensor dq = from_group_rows(dqs.mul_(scale), n, kv, g);
    return {dq, dk.view({n, kv, lk, d}), dv.view({n, kv, lk, d}), at::Tensor()};
  }
};

void check_attention_args(const char* what, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          int64_t block_rows) {
  PTK_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 && q.size(2) <= k.size(2),
            std::string(what) + ": q (N, heads, Lq, D), k/v (N, kv, Lk, D) with heads % kv == 0 and Lq <= Lk "
            "expected, got " + c10::str(q.sizes()) + ", " + c10::str(k.sizes()) + ", " + c10::str(v.sizes()));
  PTK_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
            std::string(what) + ": float32 only");
  PTK_CHECK(block_rows > 0, std::string(what) + ": block_rows must be > 0");
}

}  // namespace

bool causal_flash_attention_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return flash_attention_cpu_supported(q, k, v);
}

at::Tensor causal_flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block_rows) {
  check_attention_args("causal_flash_attention", q, k, v, block_rows);
  PTK_CHECK(causal_flash_attention_supported(q, k, v),
            "causal_flash_attention: needs a CPU with AVX-512F and a head size that is a multiple of 16");
  return FlashCausalAttention::apply(q, k, v, block_rows);
}

at::Tensor causal_block_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block_rows) {
  check_attention_args("causal_block_attention", q, k, v, block_rows);
  return CausalBlockAttention::apply(q, k, v, block_rows);
}

}  // namespace ptk::kernels::cpu
