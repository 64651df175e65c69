#include "core/kernels/ref/attention.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace ptk::kernels::ref {
namespace {

at::Tensor causal_mask(int64_t q_len, int64_t k_len, const at::Tensor& like) {
  // (q_len, k_len): query i (the last q_len of k_len positions) sees keys j <= k_len - q_len + i.
  return at::full({q_len, k_len}, -std::numeric_limits<float>::infinity(), like.options().dtype(at::kFloat))
      .triu(k_len - q_len + 1);
}

}  // namespace

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const bool batched = q.dim() == 4;
  const int64_t n = batched ? q.size(0) : 1, heads = q.size(-3), kv = k.size(-3), g = heads / kv, lq = q.size(-2),
                lk = k.size(-2), d = q.size(-1);
  at::Tensor qg = (q * (1.0 / std::sqrt(static_cast<double>(d)))).reshape({n * kv, g * lq, d});
  at::Tensor scores = at::bmm(qg, k.reshape({n * kv, lk, d}).transpose(1, 2));  // (n kv, g Lq, Lk)
  // Out of place: an in-place add on this view costs a CopySlices node in backward (4% of a step).
  scores = scores.view({n * kv, g, lq, lk}) + causal_mask(lq, lk, q);
  auto p = at::softmax(scores, -1, at::kFloat).to(q.scalar_type()).view({n * kv, g * lq, lk});
  auto out = at::bmm(p, v.reshape({n * kv, lk, d}));  // (n kv, g Lq, D)
  return batched ? out.view({n, heads, lq, d}) : out.view({heads, lq, d});
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t heads = q.size(-3), kv = k.size(-3), g = heads / kv, lq = q.size(-2), lk = k.size(-2), d = q.size(-1);
  at::Tensor qg = q.view({kv, g, lq, d});
  at::Tensor scores = at::matmul(qg, k.unsqueeze(-3).transpose(-1, -2)) / std::sqrt(static_cast<double>(d));
  scores = scores + causal_mask(lq, lk, q);  // promotes to float32 for the softmax
  auto p = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  auto out = at::matmul(p, v.unsqueeze(-3));  // (kv, g, Lq, D)
  return out.reshape({heads, lq, d});
}

DecodePlan plan_decode(const std::vector<int64_t>& slots, const std::vector<int64_t>& lens, int64_t max_k,
                       at::Device dev, int force) {
  const int64_t R = static_cast<int64_t>(slots.size());
  DecodePlan b;
  auto opt = at::TensorOptions().dtype(at::kLong);
  b.slots = at::tensor(slots, opt).to(dev);
  const auto lo_hi = std::minmax_element(slots.begin(), slots.end());
  const int64_t lo = *lo_hi.first, n = *lo_hi.second - lo + 1;
  b.window = force == 1 ? true : force == 2 ? false : n <= 2 * R;
  b.max_k = max_k;
  std::vector<int64_t> visible;  // keys visible to each computed row
  if (b.window) {
    b.lo = lo;
    b.n = n;
    visible.assign(static_cast<size_t>(n), 1);  // rows of idle slots: key 0 only (never all masked: no NaN)
    std::vector<int64_t> rows(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      rows[r] = slots[r] - lo;
      visible[rows[r]] = lens[r];
    }
    b.rows = at::tensor(rows, opt).to(dev);
  } else {
    b.n = R;
    visible = lens;
  }
  b.invisible = at::arange(max_k, opt.device(dev)).unsqueeze(0) >= at::tensor(visible, opt).to(dev).unsqueeze(1);
  return b;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& K, const at::Tensor& V, const DecodePlan& b) {
  const int64_t R = q.size(0), nh = q.size(1), D = q.size(2), nkv = K.size(1), g = nh / nkv, n = b.n;
  at::Tensor Kw, Vw, qw;
  if (b.window) {
    Kw = K.narrow(0, b.lo, n).narrow(2, 0, b.max_k);  // (n, nkv, max_k, D), a view
    Vw = V.narrow(0, b.lo, n).narrow(2, 0, b.max_k);
    qw = n == R ? q : at::zeros({n, nh, D}, q.options()).index_copy_(0, b.rows, q);
  } else {
    Kw = index_rows(K.narrow(2, 0, b.max_k), b.slots);  // (R, nkv, max_k, D), a copy
    Vw = index_rows(V.narrow(2, 0, b.max_k), b.slots);
    qw = q;
  }
  // Grouped-query attention as one bmm over (row, kv head): the g query heads of a kv head are
  // the rows of one (g, D) x (D, max_k) product, so K/V are never expanded to nh heads.
  auto Kf = Kw.reshape({n * nkv, b.max_k, D}), Vf = Vw.reshape({n * nkv, b.max_k, D});
  auto scores = at::bmm(qw.reshape({n * nkv, g, D}), Kf.transpose(1, 2)) / std::sqrt(static_cast<double>(D));
  scores = scores.to(at::kFloat).view({n, nkv, g, b.max_k})
               .masked_fill(b.invisible.view({n, 1, 1, b.max_k}), -std::numeric_limits<float>::infinity());
  auto p = at::softmax(scores, -1).to(q.scalar_type()).view({n * nkv, g, b.max_k});
  auto out = at::bmm(p, Vf).view({n, nh, D});
  return b.window && n != R ? index_rows(out, b.rows) : out;
}

at::Tensor index_rows(const at::Tensor& x, const at::Tensor& idx) {
  if (!x.is_meta()) return x.index_select(0, idx);
  std::vector<int64_t> view(static_cast<size_t>(x.dim()), 1), shape(x.sizes().begin(), x.sizes().end());
  view[0] = idx.numel();
  shape[0] = idx.numel();
  return x.gather(0, idx.reshape(view).expand(shape));
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) { return at::linear(x, w, b); }

}  // namespace ptk::kernels::ref
