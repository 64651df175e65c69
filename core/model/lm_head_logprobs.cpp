#include "core/model/lm_head_logprobs.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/util/error.h"

namespace ptk::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t rows_per_chunk(const LogProbOptions& o, int64_t vocab) {
  if (o.chunk_rows > 0) return o.chunk_rows;
  return std::max<int64_t>(1, o.chunk_bytes / (vocab * 4));
}

// Logits of one chunk in fp32, scaled by 1/temperature, masked past valid_vocab. (c, V)
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w32, double inv_t, int64_t valid_vocab) {
  at::Tensor z = torch::mm(h.to(torch::kFloat32), w32.t());
  if (inv_t != 1.0) z.mul_(inv_t);
  if (valid_vocab > 0 && valid_vocab < z.size(1)) z.slice(1, valid_vocab).fill_(-INFINITY);
  return z;
}

struct LmHeadLogProbs : public torch::autograd::Function<LmHeadLogProbs> {
  static variable_list forward(AutogradContext* ctx, at::Tensor hidden, at::Tensor weight, at::Tensor targets,
                               double temperature, int64_t chunk, int64_t valid_vocab) {
    const int64_t n = hidden.size(0);
    const double inv_t = 1.0 / temperature;
    at::Tensor w32 = weight.scalar_type() == torch::kFloat32 ? weight : weight.to(torch::kFloat32);
    auto f32 = hidden.options().dtype(torch::kFloat32);
    at::Tensor logp = torch::empty({n}, f32), ent = torch::empty({n}, f32), lse = torch::empty({n}, f32);
    at::Tensor correct = torch::empty({n}, hidden.options().dtype(torch::kBool));
    for (int64_t s = 0; s < n; s += chunk) {
      int64_t e = std::min(n, s + chunk);
      at::Tensor z = chunk_logits(hidden.slice(0, s, e), w32, inv_t, valid_vocab);  // (c, V)
      at::Tensor l = torch::logsumexp(z, 1);                                           // (c)
      at::Tensor t = targets.slice(0, s, e);
      logp.slice(0, s, e).copy_(z.gather(1, t.unsqueeze(1)).squeeze(1) - l);
      // H = lse - sum p z  (p = exp(z - lse)); masked entries have p = 0 and contribute 0.
      at::Tensor p = (z - l.unsqueeze(1)).exp_();
      at::Tensor pz = torch::where(p > 0, p * z, torch::zeros({}, f32));
      ent.slice(0, s, e).copy_(l - pz.sum(1));
      correct.slice(0, s, e).copy_(z.argmax(1).eq(t));
      lse.slice(0, s, e).copy_(l);
    }
    ctx->save_for_backward({hidden, weight, targets, lse, ent});
    ctx->saved_data["inv_t"] = inv_t;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["valid_vocab"] = valid_vocab;
    ctx->mark_non_differentiable({correct});
    // An unused output (SFT reads only logprobs) arrives as an undefined grad instead of zeros, so
    // backward skips that output's term (for entropy: ~6 passes over every (c, V) chunk).
    ctx->set_materialize_grads(false);
    return {logp, ent, correct};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor hidden = saved[0], weight = saved[1], targets = saved[2], lse = saved[3], ent = saved[4];
    const double inv_t = ctx->saved_data["inv_t"].toDouble();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const int64_t valid_vocab = ctx->saved_data["valid_vocab"].toInt();
    at::Tensor g_lp = grads[0], g_ent = grads[1];  // (N) each, possibly undefined
    const int64_t n = hidden.size(0);
    at::Tensor w32 = weight.scalar_type() == torch::kFloat32 ? weight : weight.to(torch::kFloat32);
    auto f32 = hidden.options().dtype(torch::kFloat32);
    at::Tensor d_hidden = torch::empty({n, hidden.size(1)}, f32);
    at::Tensor d_weight = torch::zeros(w32.sizes(), f32);
    for (int64_t s = 0; s < n; s += chunk) {
      int64_t e = std::min(n, s + chunk);
      at::Tensor h = hidden.slice(0, s, e).to(torch::kFloat32);
      at::Tensor z = chunk_logits(h, w32, inv_t, valid_vocab);  // (c, V)
      at::Tensor p = (z - lse.slice(0, s, e).unsqueeze(1)).exp_();
      at::Tensor dz = torch::zeros_like(z);
      if (g_lp.defined()) {
        // d logp_t / dz = onehot(t) - p
        at::Tensor g = g_lp.slice(0, s, e).unsqueeze(1);
        dz.sub_(p * g);
        dz.scatter_add_(1, targets.slice(0, s, e).unsqueeze(1), g);
      }
      if (g_ent.defined()) {
        // dH/dz_j = -p_j (log p_j + H), log p_j = z_j - lse; masked entries have p_j = 0.
        at::Tensor logp = z - lse.slice(0, s, e).unsqueeze(1);
        at::Tensor term = torch::where(p > 0, p * (logp + ent.slice(0, s, e).unsqueeze(1)), torch::zeros({}, f32));
        dz.sub_(term * g_ent.slice(0, s, e).unsqueeze(1));
      }
      if (inv_t != 1.0) dz.mul_(inv_t);
      d_hidden.slice(0, s, e).copy_(torch::mm(dz, w32));
      d_weight.addmm_(dz.t(), h);
    }
    return {d_hidden.to(hidden.scalar_type()), d_weight.to(weight.scalar_type()), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

TokenLogProbs lm_head_logprobs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               const LogProbOptions& options) {
  PTK_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
            "lm_head_logprobs: hidden (N, H) and weight (V, H) expected, got " + c10::str(hidden.sizes()) + " and " +
                c10::str(weight.sizes()));
  PTK_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
            "lm_head_logprobs: targets must be (N) = " + std::to_string(hidden.size(0)));
  PTK_CHECK(options.temperature > 0, "lm_head_logprobs: temperature must be > 0");
  int64_t chunk = rows_per_chunk(options, weight.size(0));
  auto out = LmHeadLogProbs::apply(hidden, weight, targets.to(torch::kInt64), options.temperature, chunk,
                                   options.valid_vocab);
  return {out[0], out[1], out[2]};
}

}  // namespace ptk::model
