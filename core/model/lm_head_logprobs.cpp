#include "core/model/lm_head_logprobs.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/kernels/cpu/lm_head_rows_cpu.h"
#include "core/kernels/dispatch.h"
#include "core/util/error.h"

namespace ptk::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t rows_per_chunk(const LogProbOptions& o, int64_t vocab) {
  if (o.chunk_rows > 0) return o.chunk_rows;
  return std::max<int64_t>(1, o.chunk_bytes / (vocab * 4));
}

// Logits of one chunk in fp32 over the valid vocabulary (rows of w32 already cut to it), scaled
// by 1/temperature: (c, Vv). Ids at or past valid_vocab have logit -inf, probability 0 and zero
// gradient, so they are simply never computed. Written into z: the kept (N, Vv) logits, or rows of
// one chunk buffer that every chunk reuses.
// With a bf16/fp16 weight off the CPU (see in_weight_dtype), `w32` is that weight itself: the GEMM
// runs in its dtype and writes fp32 logits (no fp32 copy of the weight).
at::Tensor chunk_logits_out(at::Tensor z, const at::Tensor& h, const at::Tensor& w32, double inv_t) {
  if (w32.scalar_type() != torch::kFloat32) {
    if (w32.is_cuda()) torch::mm_out(z, h.to(w32.scalar_type()), w32.t(), torch::kFloat32);
    else z.copy_(torch::mm(h.to(w32.scalar_type()), w32.t()));
  } else {
    torch::mm_out(z, h.to(torch::kFloat32), w32.t());
  }
  if (inv_t != 1.0) z.mul_(inv_t);
  return z;
}

// One (rows, Vv) buffer for every chunk of a pass, allocated once. A fresh 256 MiB block per chunk
// fragmented glibc's kept heap (lm_head_memory_test's rise went from 1.03 GiB to 1.5-2.0 GiB in some
// runs); large blocks now come from runtime/cpu_allocator.h, and one buffer still spares a
// cache lookup and a possible re-map per chunk.
at::Tensor chunk_buffer(int64_t n, int64_t chunk, int64_t vocab, const at::TensorOptions& f32) {
  return torch::empty({std::min(n, chunk), vocab}, f32);
}

// Whether the GEMMs run in the weight's own dtype (bf16/fp16 weights on CUDA and on the `meta`
// device: a (V, H) fp32 copy of a 0.5B model's embedding is 545 MB, of a 7B's 2.2 GB). On the CPU
// a half-precision weight is still upcast once (its GEMMs are emulated; fp32 is both faster and
// what the CPU tests pin).
bool in_weight_dtype(const at::Tensor& weight) {
  return weight.scalar_type() != torch::kFloat32 && !weight.is_cpu();
}

// The weight in fp32 (or in its own dtype, see in_weight_dtype), cut to the valid vocabulary.
at::Tensor valid_weight(const at::Tensor& weight, int64_t valid_vocab) {
  at::Tensor w32 = weight.scalar_type() == torch::kFloat32 || in_weight_dtype(weight) ? weight : weight.to(torch::kFloat32);
  if (valid_vocab > 0 && valid_vocab < w32.size(0)) w32 = w32.narrow(0, 0, valid_vocab);
  return w32;
}

// On AVX-512 CPUs (kernels/cpu/lm_head_rows_cpu.h) forward reads each row twice and backward (for
// a loss of the log-probs only) writes it once; kernels.lm_head = ref (PTK_LM_HEAD_ROWS=aten) keeps
// the ATen passes below (tests compare both).
bool rows_kernel(const at::Tensor& z) {
  return kernels::select_lm_head(kernels::cpu::lm_head_rows_supported(z), kernels::options()) ==
         kernels::LmHead::kCpuRows;
}
using kernels::cpu::lm_head_logp_grad_inplace;
using kernels::cpu::lm_head_row_stats;

// Every pass over a (c, V) chunk costs about as much as a sizeable slice of the chunk's GEMM at
// real vocabulary sizes, so both directions keep them few: forward reads z for the row max (with
// the argmax), writes exp(z - max) once, reads it for the sum and, multiplied in place by z, for
// the entropy; backward turns the recomputed z into the gradient in place.
struct LmHeadLogProbs : public torch::autograd::Function<LmHeadLogProbs> {
  static variable_list forward(AutogradContext* ctx, at::Tensor hidden, at::Tensor weight, at::Tensor targets,
                               double temperature, int64_t chunk, int64_t valid_vocab, int64_t keep_bytes) {
    const int64_t n = hidden.size(0);
    const double inv_t = 1.0 / temperature;
    at::Tensor w32 = valid_weight(weight, valid_vocab);
    auto f32 = hidden.options().dtype(torch::kFloat32);
    at::Tensor logp = torch::empty({n}, f32), ent = torch::empty({n}, f32), lse = torch::empty({n}, f32);
    at::Tensor correct = torch::empty({n}, hidden.options().dtype(torch::kBool));
    const bool keep = n > 0 && n * w32.size(0) * 4 <= keep_bytes;
    at::Tensor kept = keep ? torch::empty({n, w32.size(0)}, f32) : at::Tensor();  // (N, Vv) logits
    // Kept: one GEMM over all rows (BLAS packs the (V, H) weight once, not once per chunk).
    if (keep) chunk_logits_out(kept, hidden, w32, inv_t);
    at::Tensor buf = keep ? at::Tensor() : chunk_buffer(n, chunk, w32.size(0), f32);
    for (int64_t s = 0; s < n; s += chunk) {
      int64_t e = std::min(n, s + chunk);
      at::Tensor z = keep ? kept.slice(0, s, e)
                          : chunk_logits_out(buf.narrow(0, 0, e - s), hidden.slice(0, s, e), w32, inv_t);  // (c, V)
      at::Tensor t = targets.slice(0, s, e);
      if (rows_kernel(z)) {  // two passes over each row instead of ATen's nine
        lm_head_row_stats(z, t, lse.slice(0, s, e), logp.slice(0, s, e), ent.slice(0, s, e), correct.slice(0, s, e));
        continue;
      }
      auto [m, arg] = z.max(1);                                         // (c), (c)
      at::Tensor q = (z - m.unsqueeze(1)).exp_();                       // unnormalised probabilities
      at::Tensor sum = q.sum(1);
      at::Tensor l = m + sum.log();                                     // log-sum-exp
      logp.slice(0, s, e).copy_(z.gather(1, t.unsqueeze(1)).squeeze(1) - l);
      // H = lse - sum_j p_j z_j, p = q / sum.
      ent.slice(0, s, e).copy_(l - q.mul_(z).sum(1) / sum);
      correct.slice(0, s, e).copy_(arg.eq(t));
      lse.slice(0, s, e).copy_(l);
    }
    ctx->save_for_backward({hidden, weight, targets, lse, ent});
    ctx->saved_data["inv_t"] = inv_t;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["valid_vocab"] = valid_vocab;
    // Not a saved variable: backward overwrites it with the gradient and drops it (a second
    // backward through a retained graph finds none and recomputes).
    ctx->saved_data["kept"] = kept;
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
    const at::Tensor kept = ctx->saved_data["kept"].toTensor();
    const bool use_kept = kept.defined();
    // Released with this function's end, not the graph's (saved_data outlives backward).
    ctx->saved_data["kept"] = at::Tensor();
    const int64_t n = hidden.size(0);
    at::Tensor w32 = valid_weight(weight, valid_vocab);
    auto f32 = hidden.options().dtype(torch::kFloat32);
    at::Tensor d_hidden = torch::empty({n, hidden.size(1)}, f32);
    // A frozen weight (LoRA's base) gets no gradient: no (V, H) buffer and half the GEMMs.
    const bool want_weight = ctx->needs_input_grad(1);
    // The first chunk writes the valid rows' gradient (mm_out), later chunks add to it: no zero
    // fill and no extra read of the (V, H) gradient. Rows past valid_vocab get no gradient: zeros.
    at::Tensor d_weight, d_valid;
    if (want_weight) {
      d_weight = torch::empty(weight.sizes(), f32);
      d_valid = d_weight.narrow(0, 0, w32.size(0));
      if (w32.size(0) < d_weight.size(0)) d_weight.narrow(0, w32.size(0), d_weight.size(0) - w32.size(0)).zero_();
      if (n == 0) d_valid.zero_();
    }
    at::Tensor buf = use_kept ? at::Tensor() : chunk_buffer(n, chunk, w32.size(0), f32);
    for (int64_t s = 0; s < n; s += chunk) {
      int64_t e = std::min(n, s + chunk);
      at::Tensor h = hidden.slice(0, s, e).to(torch::kFloat32);
      // z, then log p, then dL/dz, in place: (c, V)
      at::Tensor dz = use_kept ? kept.slice(0, s, e) : chunk_logits_out(buf.narrow(0, 0, e - s), h, w32, inv_t);
      if (!g_ent.defined() && g_lp.defined() && rows_kernel(dz)) {
        // One pass: dz = inv_t g (onehot(t) - exp(z - lse)).
        lm_head_logp_grad_inplace(dz, targets.slice(0, s, e), lse.slice(0, s, e), g_lp.slice(0, s, e).contiguous(),
                                  inv_t);
      } else {
        dz.sub_(lse.slice(0, s, e).unsqueeze(1));  // log p
        if (g_ent.defined()) {
          // d logp_t / dz = onehot(t) - p;  dH/dz_j = -p_j (log p_j + H).
          // dz = p * (-g_lp - g_ent (log p + H)) + g_lp onehot(t)
          at::Tensor p = dz.exp();
          dz.add_(ent.slice(0, s, e).unsqueeze(1)).mul_(g_ent.slice(0, s, e).unsqueeze(1).neg());
          if (g_lp.defined()) dz.sub_(g_lp.slice(0, s, e).unsqueeze(1));
          dz.mul_(p);
        } else {
          dz.exp_().mul_(g_lp.slice(0, s, e).neg().unsqueeze(1));  // -g_lp p
        }
        if (g_lp.defined()) dz.scatter_add_(1, targets.slice(0, s, e).unsqueeze(1), g_lp.slice(0, s, e).unsqueeze(1));
        if (inv_t != 1.0) dz.mul_(inv_t);
      }
      if (use_kept) continue;  // one GEMM each over all rows below
      at::Tensor dh = d_hidden.slice(0, s, e);
      if (w32.scalar_type() != torch::kFloat32) {
        // Weight-dtype GEMMs (in_weight_dtype): dz and h in that dtype, products into the fp32 gradients.
        const at::Tensor dz_w = dz.to(w32.scalar_type()), h_w = hidden.slice(0, s, e).to(w32.scalar_type());
        dh.copy_(torch::mm(dz_w, w32));
        if (!want_weight) continue;
        at::Tensor dw = w32.is_cuda() ? torch::mm(dz_w.t(), h_w, torch::kFloat32) : torch::mm(dz_w.t(), h_w).to(torch::kFloat32);
        if (s == 0) d_valid.copy_(dw);
        else d_valid.add_(dw);
        continue;
      }
      torch::mm_out(dh, dz, w32);
      if (!want_weight) continue;
      if (s == 0) torch::mm_out(d_valid, dz.t(), h);
      else d_valid.addmm_(dz.t(), h);
    }
    if (use_kept && n > 0) {
      if (w32.scalar_type() != torch::kFloat32) {
        const at::Tensor dz_w = kept.to(w32.scalar_type()), h_w = hidden.to(w32.scalar_type());
        d_hidden.copy_(torch::mm(dz_w, w32));
        if (want_weight)
          d_valid.copy_(w32.is_cuda() ? torch::mm(dz_w.t(), h_w, torch::kFloat32) : torch::mm(dz_w.t(), h_w));
      } else {
        torch::mm_out(d_hidden, kept, w32);
        if (want_weight) torch::mm_out(d_valid, kept.t(), hidden.to(torch::kFloat32));
      }
    }
    return {d_hidden.to(hidden.scalar_type()), want_weight ? d_weight.to(weight.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
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
  // Keeping logits only pays when a backward will read them (not under NoGradGuard, e.g. DPO's
  // reference log-probs): otherwise they would only raise the forward's peak.
  const bool will_backward = at::GradMode::is_enabled() && (hidden.requires_grad() || weight.requires_grad());
  auto out = LmHeadLogProbs::apply(hidden, weight, targets.to(torch::kInt64).contiguous(), options.temperature, chunk,
                                   options.valid_vocab, will_backward ? options.keep_logits_bytes : 0);
  return {out[0], out[1], out[2]};
}

}  // namespace ptk::model
