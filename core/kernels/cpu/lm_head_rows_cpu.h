// The fused lm_head op's per-row passes over fp32 logits on AVX-512 CPUs. ATen's ops make 9 passes
// over each (rows, V) chunk in forward (max, subtract, exp, sum, gather, multiply, sum, ...) and 4
// read-modify-write passes in backward; a row of 151,936 logits (594 KiB) fits in L2, so here
// forward reads each row twice (max/argmax, then the sums; the second from L2) and backward writes
// it once. Used by core/model/lm_head_logprobs.cpp when lm_head_rows_supported(); the ATen path
// stays for every other case and is what tests/ops/lm_head_rows_cpu_test.cpp checks these against.
#pragma once
#include <ATen/core/Tensor.h>

namespace ptk::kernels::cpu {

// z: CPU float32 contiguous (rows, V), and this CPU has AVX-512F.
bool lm_head_rows_supported(const at::Tensor& z);

// Per row r of z (rows, V) with target t = targets[r] (int64): lse[r] = log sum_j exp z_j,
// logp[r] = z_t - lse, ent[r] = lse - sum_j p_j z_j (nats), correct[r] = (first argmax == t).
// lse/logp/ent: float32 (rows), contiguous; correct: bool (rows), contiguous.
void lm_head_row_stats(const at::Tensor& z, const at::Tensor& targets, at::Tensor lse, at::Tensor logp,
                       at::Tensor ent, at::Tensor correct);

// In place, z (rows, V) of logits -> dL/dz for L = sum_r g[r] logp[r]:
// z_j <- scale g[r] (onehot(t)_j - exp(z_j - lse[r])). g, lse: float32 (rows); targets int64.
void lm_head_logp_grad_inplace(at::Tensor z, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& g,
                               double scale);

}  // namespace ptk::kernels::cpu
