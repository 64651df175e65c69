// Qwen2 forward (packed / padded / cached), loading, saving and random init. Attention stays inside
// each document: short documents of packed rows are batched by padding (see PackedPlan), the others
// run one causal attention each; the fused backend calls SDPA where LibTorch has it.
// Not the loss and not sampling (see the trainer's chunked loss op and rollout/).
#include "core/model/qwen2.h"

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <set>

#include "core/model/causal_attention.h"
#include "core/model/decode_attention_cpu.h"
#include "core/model/kv_cache.h"
#include "core/model/packed_linear.h"
#include "core/util/error.h"

namespace ptk::model {
namespace {

using checkpoint::Qwen2Config;

// A run of tokens [start, start + len) of one row that attend to each other causally.
struct Segment {
  int64_t start;
  int64_t len;
};

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  // transformers: variance in float32, then back to the input dtype before the weight.
  auto h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return w * h.to(x.scalar_type());
}

at::Tensor rotate_half(const at::Tensor& x) {
  int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

bool use_fused(AttentionBackend b, const at::Tensor& x) {
  if (b == AttentionBackend::kFused) return true;
  if (b == AttentionBackend::kAuto) return x.is_cuda();
  return false;
}

at::Tensor causal_mask(int64_t q_len, int64_t k_len, const at::Tensor& like) {
  // (q_len, k_len): query i (the last q_len of k_len positions) sees keys j <= k_len - q_len + i.
  return at::full({q_len, k_len}, -std::numeric_limits<float>::infinity(), like.options().dtype(at::kFloat))
      .triu(k_len - q_len + 1);
}

// q (heads, Lq, D), k/v (kv_heads, Lk, D) -> (heads, Lq, D); queries are the last Lq of the Lk
// positions, causal. Batched variants take a leading batch dim: q (N, heads, Lq, D).
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool fused) {
  const bool batched = q.dim() == 4;
  const int64_t heads = q.size(-3), kv = k.size(-3), g = heads / kv, lq = q.size(-2), lk = k.size(-2),
                d = q.size(-1);
  if (fused) {
    // SDPA wants as many K/V heads as query heads: expand the groups (a copy, fused kernels only).
    std::vector<int64_t> grouped(k.sizes().begin(), k.sizes().end()), flat = grouped;
    grouped.insert(grouped.end() - 2, g);  // (.., kv, g, Lk, D)
    flat[flat.size() - 3] = heads;         // (.., heads, Lk, D)
    auto kk = k.unsqueeze(-3).expand(grouped).reshape(flat);
    auto vv = v.unsqueeze(-3).expand(grouped).reshape(flat);
    if (lq == lk) return at::scaled_dot_product_attention(q, kk, vv, {}, 0.0, /*is_causal=*/true);
    return at::scaled_dot_product_attention(q, kk, vv, causal_mask(lq, lk, q).to(q.scalar_type()), 0.0, false);
  }
  // Grouped-query attention without copying K/V: heads -> (kv_heads, group).
  at::Tensor qg = batched ? q.view({q.size(0), kv, g, lq, d}) : q.view({kv, g, lq, d});
  at::Tensor scores = at::matmul(qg, k.unsqueeze(-3).transpose(-1, -2)) / std::sqrt(static_cast<double>(d));
  scores = scores + causal_mask(lq, lk, q);  // promotes to float32 for the softmax
  auto p = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  auto out = at::matmul(p, v.unsqueeze(-3));  // (.., kv, g, Lq, D)
  return batched ? out.reshape({q.size(0), heads, lq, d}) : out.reshape({heads, lq, d});
}

// The training forward's exact attention (decoder_layer): attend()'s arithmetic laid out for BLAS.
// The query heads of each K/V group are stacked into one (g * Lq, D) matrix, so QK^T and PV are one
// GEMM per K/V head (2 at Qwen2.5-0.5B) on contiguous operands, instead of a strided matmul per
// query head over a broadcast (copied) K; 1/sqrt(D) scales q (Lq x D) rather than the scores
// (Lq x Lk). Same signature as attend(); the fused backend goes to attend().
at::Tensor attend_grouped(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool fused) {
  if (fused) return attend(q, k, v, fused);
  const bool batched = q.dim() == 4;
  // float32 on an AVX-512 CPU: causal_flash_attention (cache-sized tiles, nothing kept but one
  // log-sum-exp per query row); PTK_ATTENTION_FLASH=0 turns it off. Otherwise float32 goes to
  // causal_block_attention, which skips the masked half (blocks of query positions, each against
  // the keys it can see); PTK_ATTENTION_BLOCK_ROWS sets its block (default 128), 0 = the masked
  // full-square path below for every dtype (flash included), which also serves other dtypes.
  static const bool flash = [] {
    const char* env = std::getenv("PTK_ATTENTION_FLASH");
    return !(env && std::string(env) == "0");
  }();
  static const int64_t block_rows = [] {
    const char* env = std::getenv("PTK_ATTENTION_BLOCK_ROWS");
    return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t{128};
  }();
  if (flash && block_rows > 0 && causal_flash_attention_supported(q, k, v)) {
    if (batched) return causal_flash_attention(q, k, v);
    return causal_flash_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)).squeeze(0);
  }
  if (block_rows > 0 && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
      v.scalar_type() == at::kFloat) {
    if (batched) return causal_block_attention(q, k, v, block_rows);
    return causal_block_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), block_rows).squeeze(0);
  }
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

// Segments of every row from the input's mask or doc_lengths; true when every row is one segment
// starting at 0 (right padding or none), where one batched causal attention is exact.
std::vector<std::vector<Segment>> segments_of(const ForwardInput& in, int64_t B, int64_t T, bool* simple) {
  std::vector<std::vector<Segment>> segs(B);
  *simple = true;
  if (!in.doc_lengths.empty()) {
    PTK_CHECK(static_cast<int64_t>(in.doc_lengths.size()) == B,
              "doc_lengths has " + std::to_string(in.doc_lengths.size()) + " rows but input_ids has " +
                  std::to_string(B));
    for (int64_t b = 0; b < B; ++b) {
      int64_t s = 0;
      for (int64_t len : in.doc_lengths[b]) {
        PTK_CHECK(len > 0, "doc_lengths row " + std::to_string(b) + " has a document of length " + std::to_string(len));
        segs[b].push_back({s, len});
        s += len;
      }
      PTK_CHECK(s <= T, "doc_lengths row " + std::to_string(b) + " sums to " + std::to_string(s) +
                            ", more than the row's " + std::to_string(T) + " tokens");
      if (segs[b].size() != 1) *simple = false;
    }
    return segs;
  }
  if (!in.attention_mask.defined()) {
    for (auto& r : segs) r.push_back({0, T});
    return segs;
  }
  if (!in.row_spans.empty()) {
    PTK_CHECK(static_cast<int64_t>(in.row_spans.size()) == B,
              "row_spans has " + std::to_string(in.row_spans.size()) + " rows but input_ids has " + std::to_string(B));
    for (int64_t b = 0; b < B; ++b) {
      const auto [first, count] = in.row_spans[b];
      PTK_CHECK(first >= 0 && count >= 0 && first + count <= T,
                "row_spans row " + std::to_string(b) + " = {" + std::to_string(first) + ", " + std::to_string(count) +
                    "} does not fit a row of " + std::to_string(T) + " tokens");
      if (count == 0) {
        *simple = false;  // an all-padding row attends to nothing
        continue;
      }
      segs[b].push_back({first, count});
      if (first != 0) *simple = false;
    }
    return segs;
  }
  auto m = in.attention_mask.to(at::kCPU, at::kLong).contiguous();
  PTK_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == T,
            "attention_mask has shape " + shape_str(m.sizes()) + ", input_ids " + shape_str({B, T}));
  auto acc = m.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t first = -1, last = -1, count = 0;
    for (int64_t t = 0; t < T; ++t) {
      PTK_CHECK(acc[b][t] == 0 || acc[b][t] == 1, "attention_mask holds a value other than 0 or 1 in row " +
                                                       std::to_string(b));
      if (acc[b][t]) {
        if (first < 0) first = t;
        last = t;
        ++count;
      }
    }
    if (count == 0) {
      *simple = false;  // an all-padding row attends to nothing
      continue;
    }
    PTK_CHECK(count == last - first + 1, "attention_mask row " + std::to_string(b) +
                                             " has holes; ptk takes left or right padding (contiguous ones), or "
                                             "doc_lengths for packed rows");
    segs[b].push_back({first, count});
    if (first != 0) *simple = false;
  }
  return segs;
}

at::Tensor default_positions(const ForwardInput& in, int64_t B, int64_t T, const at::TensorOptions& o) {
  if (!in.doc_lengths.empty()) {
    std::vector<int64_t> pos(B * T, 0);
    for (int64_t b = 0; b < B; ++b) {
      int64_t t = 0;
      for (int64_t len : in.doc_lengths[b])
        for (int64_t i = 0; i < len && t < T; ++i) pos[b * T + t++] = i;
    }
    return at::tensor(pos, at::kLong).view({B, T}).to(o.device());
  }
  if (in.attention_mask.defined()) return positions_from_mask(in.attention_mask).to(o.device());
  return at::arange(T, o.dtype(at::kLong)).unsqueeze(0).expand({B, T});
}

at::Tensor normal_init(at::IntArrayRef size, double std, at::Generator& gen) {
  return at::normal(0.0, std, size, gen, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

// ---- RoPE --------------------------------------------------------------------------------------

std::pair<at::Tensor, double> rope_inv_freq(const Qwen2Config& c) {
  const int64_t d = c.head_dim;
  // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in float32.
  auto exps = at::arange(0, d, 2, at::kLong).to(at::kFloat) / static_cast<double>(d);
  auto pos_freqs = at::pow(c.rope_theta, exps);
  auto inv_freq = at::reciprocal(pos_freqs);
  if (!c.rope_scaling || c.rope_scaling->type != "yarn") return {inv_freq, 1.0};
  // YaRN (transformers' _compute_yarn_parameters; arXiv:2309.00071).
  const auto& y = *c.rope_scaling;
  const double factor = y.factor;
  const double orig = y.original_max_position_embeddings > 0 ? y.original_max_position_embeddings
                                                             : c.max_position_embeddings;
  const double attention = y.attention_factor ? *y.attention_factor : (factor <= 1 ? 1.0 : 0.1 * std::log(factor) + 1.0);
  auto correction_dim = [&](double rotations) {
    return (d * std::log(orig / (rotations * 2 * M_PI))) / (2 * std::log(c.rope_theta));
  };
  double low = std::max(std::floor(correction_dim(y.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction_dim(y.beta_slow)), static_cast<double>(d - 1));
  if (low == high) high += 0.001;
  auto ramp = ((at::arange(d / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
  auto extrapolation_factor = 1 - ramp;
  auto inv_interp = at::reciprocal(factor * pos_freqs);
  inv_freq = inv_interp * (1 - extrapolation_factor) + inv_freq * extrapolation_factor;
  return {inv_freq, attention};
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const Qwen2Config& c, const at::Tensor& positions) {
  auto [inv_freq, scale] = rope_inv_freq(c);
  auto freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq.to(positions.device());  // (P..., D/2)
  auto emb = at::cat({freqs, freqs}, -1);
  auto cos = emb.cos(), sin = emb.sin();
  if (scale != 1.0) {
    cos = cos * scale;
    sin = sin * scale;
  }
  return {cos, sin};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  auto c = cos.unsqueeze(1).to(x.scalar_type()), s = sin.unsqueeze(1).to(x.scalar_type());
  return x * c + rotate_half(x) * s;
}

at::Tensor positions_from_mask(const at::Tensor& attention_mask) {
  auto m = attention_mask.to(at::kLong);
  return (m.cumsum(-1) - 1).masked_fill(m == 0, 1);
}

at::Tensor last_token_index(const at::Tensor& attention_mask) {
  auto m = attention_mask.to(at::kLong);
  const int64_t T = m.size(-1);
  // Largest t with mask 1: argmax over t * mask (ties impossible: t is distinct).
  return (m * at::arange(T, m.options())).argmax(-1);
}

at::Tensor score_index(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                       std::optional<int64_t> pad_token_id) {
  auto m = attention_mask.to(at::kLong);
  if (pad_token_id) m = m * input_ids.ne(*pad_token_id).to(at::kLong);
  return last_token_index(m);
}

// ---- model -------------------------------------------------------------------------------------

checkpoint::NamedTensors Qwen2Model::named_parameters() const {
  checkpoint::NamedTensors out;
  out.emplace_back("model.embed_tokens.weight", embed_tokens_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& l = layers_[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.emplace_back(p + "self_attn.q_proj.weight", l.q_proj_w);
    out.emplace_back(p + "self_attn.q_proj.bias", l.q_proj_b);
    out.emplace_back(p + "self_attn.k_proj.weight", l.k_proj_w);
    out.emplace_back(p + "self_attn.k_proj.bias", l.k_proj_b);
    out.emplace_back(p + "self_attn.v_proj.weight", l.v_proj_w);
    out.emplace_back(p + "self_attn.v_proj.bias", l.v_proj_b);
    out.emplace_back(p + "self_attn.o_proj.weight", l.o_proj_w);
    out.emplace_back(p + "mlp.gate_proj.weight", l.gate_proj_w);
    out.emplace_back(p + "mlp.up_proj.weight", l.up_proj_w);
    out.emplace_back(p + "mlp.down_proj.weight", l.down_proj_w);
    out.emplace_back(p + "input_layernorm.weight", l.input_layernorm);
    out.emplace_back(p + "post_attention_layernorm.weight", l.post_attention_layernorm);
  }
  out.emplace_back("model.norm.weight", norm_);
  if (score_.defined()) {
    out.emplace_back("score.weight", score_);
  } else if (!config_.tie_word_embeddings) {
    out.emplace_back("lm_head.weight", lm_head_);
  }
  return out;
}

namespace {
// Points every parameter field at the tensor `f` returns for its HF name.
template <class F>
void assign_all(Qwen2Model& m, int64_t layers, bool lm_head, bool score, F&& f) {
  m.embed_tokens_ = f("model.embed_tokens.weight");
  m.layers_.resize(layers);
  for (int64_t i = 0; i < layers; ++i) {
    auto& l = m.layers_[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    l.q_proj_w = f(p + "self_attn.q_proj.weight");
    l.q_proj_b = f(p + "self_attn.q_proj.bias");
    l.k_proj_w = f(p + "self_attn.k_proj.weight");
    l.k_proj_b = f(p + "self_attn.k_proj.bias");
    l.v_proj_w = f(p + "self_attn.v_proj.weight");
    l.v_proj_b = f(p + "self_attn.v_proj.bias");
    l.o_proj_w = f(p + "self_attn.o_proj.weight");
    l.gate_proj_w = f(p + "mlp.gate_proj.weight");
    l.up_proj_w = f(p + "mlp.up_proj.weight");
    l.down_proj_w = f(p + "mlp.down_proj.weight");
    l.input_layernorm = f(p + "input_layernorm.weight");
    l.post_attention_layernorm = f(p + "post_attention_layernorm.weight");
  }
  m.norm_ = f("model.norm.weight");
  if (lm_head) m.lm_head_ = f("lm_head.weight");
  if (score) m.score_ = f("score.weight");
}

// Expected shape of every HF parameter name of a config.
std::vector<int64_t> expected_shape(const Qwen2Config& c, const std::string& name) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim, q = c.num_attention_heads * D,
                kv = c.num_key_value_heads * D;
  auto ends = [&](const char* s) {
    std::string suf(s);
    return name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
  };
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return {c.vocab_size, H};
  if (name == "score.weight") return {c.num_labels, H};
  if (name == "model.norm.weight" || ends("layernorm.weight")) return {H};
  if (ends("q_proj.weight")) return {q, H};
  if (ends("q_proj.bias")) return {q};
  if (ends("k_proj.weight") || ends("v_proj.weight")) return {kv, H};
  if (ends("k_proj.bias") || ends("v_proj.bias")) return {kv};
  if (ends("o_proj.weight")) return {H, q};
  if (ends("gate_proj.weight") || ends("up_proj.weight")) return {I, H};
  if (ends("down_proj.weight")) return {H, I};
  return {};
}
}  // namespace

Qwen2Model Qwen2Model::from_pretrained(const std::string& dir, const LoadOptions& options) {
  Qwen2Model m;
  m.config_ = checkpoint::read_config(dir);
  const auto& c = m.config_;
  auto tensors = checkpoint::read_checkpoint_tensors(dir);
  const bool score = c.has_score_head();
  const bool lm_head = !score && !c.tie_word_embeddings;
  std::set<std::string> used;
  assign_all(m, c.num_hidden_layers, lm_head, score, [&](const std::string& name) {
    auto it = tensors.find(name);
    if (it == tensors.end())
      throw Error(dir + ": the checkpoint has no tensor '" + name + "', which config.json (" + c.architecture + ", " +
                  std::to_string(c.num_hidden_layers) + " layers" + (c.tie_word_embeddings ? ", tied" : "") +
                  ") requires.\n---> HINT: the folder is incomplete or config.json belongs to another model.");
    auto want = expected_shape(c, name);
    if (it->second.sizes() != at::IntArrayRef(want))
      throw Error(dir + ": tensor '" + name + "' has shape " + shape_str(it->second.sizes()) + " but config.json implies " +
                  shape_str(want));
    if (!at::isFloatingType(it->second.scalar_type()))
      throw Error(dir + ": tensor '" + name + "' has non-floating dtype " + c10::toString(it->second.scalar_type()));
    used.insert(name);
    // Same dtype on CPU: the tensor stays a view of the mapped file (no copy).
    return it->second.to(options.device, options.dtype);
  });
  for (const auto& [name, t] : tensors) {
    if (used.count(name)) continue;
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;  // old exports keep the buffer
    if (name == "lm_head.weight" && c.tie_word_embeddings) continue;     // tied: transformers ignores it too
    if (name == "lm_head.weight" && score) continue;                      // a causal LM exported with a score head
    throw Error(dir + ": unexpected tensor '" + name + "' for " + c.architecture +
                "\n---> HINT: check config.json's architectures and tie_word_embeddings.");
  }
  return m;
}

Qwen2Model Qwen2Model::from_config(const Qwen2Config& config, uint64_t seed, const LoadOptions& options) {
  Qwen2Model m;
  m.config_ = config;
  const auto& c = m.config_;
  auto gen = at::detail::createCPUGenerator(seed);
  const bool score = c.has_score_head();
  assign_all(m, c.num_hidden_layers, !score && !c.tie_word_embeddings, score, [&](const std::string& name) {
    auto shape = expected_shape(c, name);
    at::Tensor t;
    if (name.find("norm") != std::string::npos) {
      t = at::ones(shape, at::kFloat);
    } else if (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
      t = at::zeros(shape, at::kFloat);
    } else {
      t = normal_init(shape, c.initializer_range, gen);
    }
    return t.to(options.device, options.dtype);
  });
  m.config_.raw_json.clear();
  return m;
}

void Qwen2Model::set_requires_grad(bool on) {
  for (auto& [name, t] : named_parameters()) t.set_requires_grad(on);
}

void Qwen2Model::add_score_head(uint64_t seed, int64_t pad_token_id) {
  if (score_.defined()) throw Error("add_score_head: the model already has a score head (" + config_.architecture + ")");
  auto gen = at::detail::createCPUGenerator(seed);
  score_ = normal_init({1, config_.hidden_size}, config_.initializer_range, gen)
               .to(embed_tokens_.device(), embed_tokens_.scalar_type());
  lm_head_ = at::Tensor();
  config_.architecture = "Qwen2ForSequenceClassification";
  config_.num_labels = 1;
  config_.pad_token_id = pad_token_id;
}

Qwen2Model Qwen2Model::clone() const {
  Qwen2Model m = *this;
  auto src = named_parameters();
  std::map<std::string, at::Tensor> copies;
  for (const auto& [name, t] : src) copies[name] = t.detach().clone();
  assign_all(m, config_.num_hidden_layers, lm_head_.defined(), score_.defined(),
             [&](const std::string& name) { return copies.at(name); });
  return m;
}

void Qwen2Model::to(at::Device device, at::ScalarType dtype) {
  std::map<std::string, at::Tensor> moved;
  for (const auto& [name, t] : named_parameters()) {
    auto x = t.detach().to(device, dtype);
    x.set_requires_grad(t.requires_grad());
    moved[name] = x;
  }
  assign_all(*this, config_.num_hidden_layers, lm_head_.defined(), score_.defined(),
             [&](const std::string& name) { return moved.at(name); });
}

at::Tensor Qwen2Model::logits(const at::Tensor& hidden) const { return at::linear(hidden, lm_head_weight()); }

at::Tensor Qwen2Model::score(const at::Tensor& hidden, const at::Tensor& index) const {
  if (!score_.defined())
    throw Error("this model has no score head (config.json architectures is " + config_.architecture +
                ", not Qwen2ForSequenceClassification)");
  auto rows = at::arange(hidden.size(0), index.options().dtype(at::kLong).device(hidden.device()));
  auto h = hidden.index({rows, index.to(hidden.device(), at::kLong)});  // (B, H)
  return at::linear(h, score_).squeeze(-1);                              // (B)
}

namespace {

// ---- packed rows: documents batched by padding ("varlen via padding") ---------------------------
//
// Rows holding several documents (doc_lengths, or left padding) cannot take one batched causal
// attention over the row. Attending each document alone is exact but costs ~13 small ops per
// document and layer (more in backward): at short documents (the tiny recipe: 8 rows x ~5 documents
// of ~55 tokens) those thousands of ops, each waking the OpenMP threads, dominate a step. Instead
// the documents are gathered into padded batches (n, heads, L, D), right-padded with zero rows, and
// each batch takes ONE causal attention: a real query i < len sees keys j <= i, all real, so the
// result is exact (pad queries see real keys, never a NaN; their outputs are dropped). The outputs
// go back to (B, T) with one row selection; positions in no document get a zero row, as before.
// No T x T mask is built. Documents are grouped by length (shortest first) while a group's padded
// score elements stay <= kMaxPadding x its real ones and <= kMaxBatchScores; documents longer than
// kMaxBatchedLen, or left alone in a group, are attended one by one (their per-op overhead is
// negligible next to their L^2 work, and padding them would cost memory).
constexpr int64_t kMaxBatchedLen = 512;
constexpr int64_t kMaxPadding = 2;                      // padded / real score elements of a group
constexpr int64_t kMaxBatchScores = int64_t(1) << 25;   // n * heads * L^2 of a group (128 MiB fp32)

// Rows of x (N, ...) with a zero row appended, picked by idx (M) in [0, N]: entry N is the zero row.
at::Tensor select_rows(const at::Tensor& x, const at::Tensor& idx) {
  std::vector<int64_t> one(x.sizes().begin(), x.sizes().end());
  one[0] = 1;
  return at::cat({x, at::zeros(one, x.options())}, 0).index_select(0, idx);
}

// y = select_rows(x, fwd) where fwd is injective on its non-zero-row entries and bwd (N) is its
// inverse (each row of x -> the row of y it went to, or M where it went nowhere). Backward is then a
// row selection too (grad_x = select_rows(grad_y, bwd)), not index_select's backward (index_add,
// which LibTorch 1.13's CPU kernel runs as one add per index). Exact: a row of x reaches at most one
// row of y, and the zero row is a constant.
struct SelectRows : public torch::autograd::Function<SelectRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fwd,
                            const at::Tensor& bwd) {
    ctx->saved_data["fwd"] = fwd;
    ctx->saved_data["bwd"] = bwd;
    return select_rows(x, fwd);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto fwd = ctx->saved_data["fwd"].toTensor(), bwd = ctx->saved_data["bwd"].toTensor();
    return {SelectRows::apply(g[0], bwd, fwd), at::Tensor(), at::Tensor()};
  }
};

// One padded batch: n documents of up to L tokens. gather (n L): slot -> flat position b T + t of
// the (B, T) input, or B T (zero row) for padding; gather_inv (B T): position -> slot, or n L.
struct DocBatch {
  int64_t n, L;
  at::Tensor gather, gather_inv;
};

// How a forward's packed rows are attended. The attention outputs are laid out as the rows of
// cat(batches' (n L, nh, D) outputs, alone documents' (len, nh, D) outputs): R rows in all;
// scatter (B T): position -> row, or R (zero) for positions in no document; scatter_inv (R):
// row -> position, or B T for padding slots.
struct PackedPlan {
  std::vector<DocBatch> batches;
  std::vector<std::pair<int64_t, Segment>> alone;  // (row, document), attended one by one
  at::Tensor scatter, scatter_inv;
};

// The plan for rows `segs` of (B, T), nh query heads; null when no group of >= 2 documents pays
// (every document then goes through the per-document loop). Deterministic in its arguments: the
// checkpointed backward rebuilds the forward's plan. PTK_PACKED_ATTENTION=per-document forces null.
std::shared_ptr<const PackedPlan> plan_packed(const std::vector<std::vector<Segment>>& segs, int64_t B, int64_t T,
                                              int64_t nh, at::Device device) {
  const char* force = std::getenv("PTK_PACKED_ATTENTION");
  if (force && std::string(force) == "per-document") return nullptr;
  struct Doc {
    int64_t len, row, start;
  };
  std::vector<Doc> docs;
  for (int64_t b = 0; b < B; ++b)
    for (const auto& g : segs[b]) docs.push_back({g.len, b, g.start});
  if (docs.size() < 2) return nullptr;
  std::stable_sort(docs.begin(), docs.end(), [](const Doc& x, const Doc& y) { return x.len < y.len; });
  std::vector<std::vector<Doc>> groups;
  std::vector<Doc> alone;
  for (size_t i = 0; i < docs.size();) {
    size_t j = i + 1;
    if (docs[i].len <= kMaxBatchedLen) {
      int64_t real = docs[i].len * docs[i].len;  // sum of L^2 over the group
      for (; j < docs.size() && docs[j].len <= kMaxBatchedLen; ++j) {
        const int64_t L = docs[j].len, n = static_cast<int64_t>(j - i + 1);
        if (n * L * L > kMaxPadding * (real + L * L) || n * nh * L * L > kMaxBatchScores) break;
        real += L * L;
      }
    }
    if (j - i >= 2) {
      groups.emplace_back(docs.begin() + i, docs.begin() + j);
    } else {
      alone.push_back(docs[i]);
    }
    i = j;
  }
  if (groups.empty()) return nullptr;
  auto plan = std::make_shared<PackedPlan>();
  const int64_t BT = B * T;
  int64_t R = 0;
  for (const auto& gr : groups) R += static_cast<int64_t>(gr.size()) * gr.back().len;
  for (const auto& d : alone) R += d.len;
  std::vector<int64_t> scatter(BT, R), scatter_inv(R, BT);
  int64_t row = 0;  // next row of the concatenated outputs
  auto opt = at::TensorOptions().dtype(at::kLong);
  for (const auto& gr : groups) {
    const int64_t n = static_cast<int64_t>(gr.size()), L = gr.back().len;
    std::vector<int64_t> gather(n * L, BT), gather_inv(BT, n * L);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < gr[i].len; ++t) {
        const int64_t pos = gr[i].row * T + gr[i].start + t, slot = i * L + t;
        gather[slot] = pos, gather_inv[pos] = slot;
        scatter[pos] = row + slot, scatter_inv[row + slot] = pos;
      }
    row += n * L;
    plan->batches.push_back({n, L, at::tensor(gather, opt).to(device), at::tensor(gather_inv, opt).to(device)});
  }
  for (const auto& d : alone) {
    for (int64_t t = 0; t < d.len; ++t) {
      const int64_t pos = d.row * T + d.start + t;
      scatter[pos] = row + t, scatter_inv[row + t] = pos;
    }
    row += d.len;
    plan->alone.push_back({d.row, {d.start, d.len}});
  }
  plan->scatter = at::tensor(scatter, opt).to(device);
  plan->scatter_inv = at::tensor(scatter_inv, opt).to(device);
  return plan;
}

// What a decoder layer needs besides its weights and input: head layout, norm epsilon, attention
// kernel, and the row segments (documents / unpadded spans) attention stays inside.
struct LayerShape {
  int64_t nh, nkv, D;
  double eps;
  bool fused;   // SDPA per document
  bool simple;  // every row is one segment from position 0: one batched causal attention
  std::vector<std::vector<Segment>> segs;
  std::shared_ptr<const PackedPlan> packed;  // !simple: the padded batches (plan_packed), or null
};

// The layer's parameters as a flat list, in a fixed order (the checkpoint Function's inputs).
constexpr size_t kLayerTensors = 12;
std::vector<at::Tensor> layer_tensors(const Qwen2Layer& l) {
  return {l.input_layernorm, l.q_proj_w, l.q_proj_b, l.k_proj_w,    l.k_proj_b,   l.v_proj_w,
          l.v_proj_b,        l.o_proj_w, l.post_attention_layernorm, l.gate_proj_w, l.up_proj_w, l.down_proj_w};
}
Qwen2Layer layer_from(const std::vector<at::Tensor>& t) {
  PTK_CHECK(t.size() == kLayerTensors, "layer_from: expected " + std::to_string(kLayerTensors) + " tensors");
  Qwen2Layer l;
  l.input_layernorm = t[0], l.q_proj_w = t[1], l.q_proj_b = t[2], l.k_proj_w = t[3], l.k_proj_b = t[4];
  l.v_proj_w = t[5], l.v_proj_b = t[6], l.o_proj_w = t[7], l.post_attention_layernorm = t[8];
  l.gate_proj_w = t[9], l.up_proj_w = t[10], l.down_proj_w = t[11];
  return l;
}

// One decoder layer: x (B, T, H) -> (B, T, H). The one body both the plain and the checkpointed
// paths run. cos/sin (B, T, D) float32.
at::Tensor decoder_layer(const Qwen2Layer& l, const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                         const LayerShape& s) {
  // The scopes name the phases in a profile (bench/train_step_bench); free when no profiler runs.
  const int64_t B = x_in.size(0), T = x_in.size(1), nh = s.nh, nkv = s.nkv, D = s.D;
  at::Tensor h, q, k, v, a, x;
  {
    RECORD_FUNCTION("ptk::norm", std::vector<c10::IValue>());
    h = rms_norm(x_in, l.input_layernorm, s.eps);
  }
  {
    RECORD_FUNCTION("ptk::qkv_proj", std::vector<c10::IValue>());
    q = at::linear(h, l.q_proj_w, l.q_proj_b).view({B, T, nh, D}).transpose(1, 2);   // (B, nh, T, D)
    k = at::linear(h, l.k_proj_w, l.k_proj_b).view({B, T, nkv, D}).transpose(1, 2);  // (B, nkv, T, D)
    v = at::linear(h, l.v_proj_w, l.v_proj_b).view({B, T, nkv, D}).transpose(1, 2);  // (B, nkv, T, D)
  }
  {
    RECORD_FUNCTION("ptk::rope", std::vector<c10::IValue>());
    q = apply_rope(q, cos, sin);
    k = apply_rope(k, cos, sin);
  }
  {
    RECORD_FUNCTION("ptk::attention", std::vector<c10::IValue>());
    if (s.simple) {
      a = attend_grouped(q, k, v, s.fused);  // one document per row from position 0: the row's causal mask
    } else if (s.packed) {
      // Flat (B T, heads, D) rows -> padded batches -> one attention each -> back to (B, nh, T, D).
      const auto& P = *s.packed;
      auto flat = [&](const at::Tensor& t, int64_t heads) { return t.transpose(1, 2).reshape({B * T, heads, D}); };
      const auto qf = flat(q, nh), kf = flat(k, nkv), vf = flat(v, nkv);
      std::vector<at::Tensor> parts;
      for (const auto& d : P.batches) {
        RECORD_FUNCTION("ptk::attention_padded_batch", std::vector<c10::IValue>());
        auto pad = [&](const at::Tensor& f, int64_t heads) {
          return SelectRows::apply(f, d.gather, d.gather_inv).view({d.n, d.L, heads, D}).transpose(1, 2);
        };
        auto o = attend_grouped(pad(qf, nh), pad(kf, nkv), pad(vf, nkv), s.fused);  // (n, nh, L, D)
        parts.push_back(o.transpose(1, 2).reshape({d.n * d.L, nh, D}));
      }
      for (const auto& [b, g] : P.alone) {
        RECORD_FUNCTION("ptk::attention_alone_document", std::vector<c10::IValue>());
        parts.push_back(attend_grouped(q[b].narrow(1, g.start, g.len), k[b].narrow(1, g.start, g.len),
                                       v[b].narrow(1, g.start, g.len), s.fused)
                            .transpose(0, 1));  // (len, nh, D)
      }
      auto rows = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
      a = SelectRows::apply(rows, P.scatter, P.scatter_inv).view({B, T, nh, D}).transpose(1, 2);
    } else {
      std::vector<at::Tensor> rows;
      for (int64_t b = 0; b < B; ++b) {
        std::vector<at::Tensor> parts;
        int64_t t = 0;
        for (const auto& g : s.segs[b]) {
          if (g.start > t) parts.push_back(at::zeros({nh, g.start - t, D}, q.options()));
          parts.push_back(attend_grouped(q[b].narrow(1, g.start, g.len), k[b].narrow(1, g.start, g.len),
                                 v[b].narrow(1, g.start, g.len), s.fused));
          t = g.start + g.len;
        }
        if (t < T) parts.push_back(at::zeros({nh, T - t, D}, q.options()));
        rows.push_back(parts.size() == 1 ? parts[0] : at::cat(parts, 1));
      }
      a = at::stack(rows, 0);  // (B, nh, T, D)
    }
  }
  {
    RECORD_FUNCTION("ptk::o_proj", std::vector<c10::IValue>());
    a = a.transpose(1, 2).reshape({B, T, nh * D});
    x = x_in + at::linear(a, l.o_proj_w);
  }
  {
    RECORD_FUNCTION("ptk::norm", std::vector<c10::IValue>());
    h = rms_norm(x, l.post_attention_layernorm, s.eps);
  }
  RECORD_FUNCTION("ptk::mlp", std::vector<c10::IValue>());
  return x + at::linear(at::silu(at::linear(h, l.gate_proj_w)) * at::linear(h, l.up_proj_w), l.down_proj_w);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Activation checkpointing for one decoder layer (what torch.utils.checkpoint does, which LibTorch
// C++ lacks): forward runs decoder_layer without recording a graph and keeps only its input;
// backward runs it again with grad on and back-propagates into the input and the parameters.
// Saved per layer: x (B, T, H) instead of every intermediate (~37 x (B, T, H) plus the attention
// probabilities); cost: one more forward of the layer during backward.
struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  // Inputs in edge order: x, cos, sin, then the kLayerTensors parameters; `shape` is not a tensor.
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::Tensor cos, at::Tensor sin,
                               at::TensorList params, const LayerShape& shape) {
    std::vector<at::Tensor> keep{x, cos, sin};
    keep.insert(keep.end(), params.begin(), params.end());
    ctx->save_for_backward(keep);
    // The shape travels as IValues: segments flattened to (count, start, len, ...) per row.
    std::vector<int64_t> segs;
    for (const auto& row : shape.segs) {
      segs.push_back(static_cast<int64_t>(row.size()));
      for (const auto& g : row) segs.insert(segs.end(), {g.start, g.len});
    }
    ctx->saved_data["heads"] = std::vector<int64_t>{shape.nh, shape.nkv, shape.D};
    ctx->saved_data["eps"] = shape.eps;
    ctx->saved_data["fused"] = shape.fused;
    ctx->saved_data["simple"] = shape.simple;
    ctx->saved_data["segs"] = segs;
    return {decoder_layer(layer_from(std::vector<at::Tensor>(params.begin(), params.end())), x, cos, sin, shape)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto heads = ctx->saved_data["heads"].toIntVector();
    LayerShape shape{heads[0], heads[1], heads[2], ctx->saved_data["eps"].toDouble(),
                     ctx->saved_data["fused"].toBool(), ctx->saved_data["simple"].toBool(), {}, nullptr};
    auto segs = ctx->saved_data["segs"].toIntVector();
    for (size_t i = 0; i < segs.size();) {
      std::vector<Segment> row(static_cast<size_t>(segs[i++]));
      for (auto& g : row) g = {segs[i], segs[i + 1]}, i += 2;
      shape.segs.push_back(std::move(row));
    }
    // The forward's padded batches, rebuilt from the segments (plan_packed is deterministic).
    if (!shape.simple)
      shape.packed = plan_packed(shape.segs, saved[0].size(0), saved[0].size(1), shape.nh, saved[0].device());
    // Fresh leaves sharing storage with the saved tensors; only those autograd asked for get grads.
    std::vector<at::Tensor> leaves(saved.size()), wanted;
    std::vector<size_t> wanted_index;
    for (size_t i = 0; i < saved.size(); ++i) {
      leaves[i] = saved[i].detach();
      if (i != 1 && i != 2 && ctx->needs_input_grad(i)) {  // cos/sin are tables, never trained
        leaves[i].requires_grad_(true);
        wanted.push_back(leaves[i]);
        wanted_index.push_back(i);
      }
    }
    variable_list out(saved.size() + 1);  // + the non-tensor shape argument
    if (wanted.empty()) return out;
    at::Tensor y;
    {
      at::AutoGradMode grad_on(true);
      y = decoder_layer(layer_from(std::vector<at::Tensor>(leaves.begin() + 3, leaves.end())), leaves[0], leaves[1],
                        leaves[2], shape);
    }
    auto g = torch::autograd::grad({y}, wanted, {grads[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    for (size_t j = 0; j < wanted.size(); ++j) out[wanted_index[j]] = g[j];
    return out;
  }
};

at::Tensor checkpointed_layer(const Qwen2Layer& l, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const LayerShape& shape) {
  auto params = layer_tensors(l);
  return CheckpointedLayer::apply(x, cos, sin, at::TensorList(params), shape)[0];
}

}  // namespace

ForwardOutput Qwen2Model::forward(const ForwardInput& in, const ForwardOptions& options) const {
  const auto& c = config_;
  PTK_CHECK(in.input_ids.defined() && in.input_ids.dim() == 2, "input_ids must be a (B, T) tensor");
  PTK_CHECK(!(in.attention_mask.defined() && !in.doc_lengths.empty()),
            "give either attention_mask (padded rows) or doc_lengths (packed rows), not both");
  const int64_t B = in.input_ids.size(0), T = in.input_ids.size(1), D = c.head_dim, nh = c.num_attention_heads,
                nkv = c.num_key_value_heads;
  auto ids = in.input_ids.to(embed_tokens_.device(), at::kLong);
  // Checked where the ids are host memory (no synchronisation); ids already on a GPU are checked by
  // the embedding kernel itself, and meta tensors hold no values.
  if (ids.numel() > 0 && in.input_ids.is_cpu()) {
    const auto host = in.input_ids.to(at::kLong);
    int64_t lo = host.min().item<int64_t>(), hi = host.max().item<int64_t>();
    PTK_CHECK(lo >= 0 && hi < c.vocab_size, "input_ids hold token " + std::to_string(lo < 0 ? lo : hi) +
                                                " outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  }
  bool simple = true;
  auto segs = segments_of(in, B, T, &simple);
  auto positions = in.positions.defined() ? in.positions.to(ids.device(), at::kLong)
                                          : default_positions(in, B, T, ids.options());
  PTK_CHECK(positions.sizes() == ids.sizes(), "positions has shape " + shape_str(positions.sizes()) +
                                                  ", input_ids " + shape_str(ids.sizes()));
  auto [cos, sin] = rope_cos_sin(c, positions);  // (B, T, D) float32
  const bool fused = use_fused(options.backend, embed_tokens_);

  LayerShape shape{nh, nkv, D, c.rms_norm_eps, fused, simple, std::move(segs), nullptr};
  if (!simple) shape.packed = plan_packed(shape.segs, B, T, nh, ids.device());  // once per forward
  // Checkpointing only pays when a graph is being recorded (not under NoGradGuard / evaluation).
  const bool checkpointed = options.activation_checkpointing && at::GradMode::is_enabled();

  ForwardOutput out;
  at::Tensor x;
  {
    RECORD_FUNCTION("ptk::embedding", std::vector<c10::IValue>());
    // Tied LM (no score head): the lm_head op's dense (V, H) gradient reaches this weight too, and
    // autograd adds a sparse (T rows) embedding gradient into it in place. A dense one would be a
    // zero-filled (V, H) tensor plus a full add: ~1 s a step at the 0.5B shape (train_step_bench).
    // CPU only: on a GPU the dense gradient is one scatter-add kernel (and meta has no sparse kernels).
    const bool sparse_grad = config_.tie_word_embeddings && !score_.defined() && at::GradMode::is_enabled() &&
                             embed_tokens_.requires_grad() && embed_tokens_.is_cpu();
    x = at::embedding(embed_tokens_, ids, /*padding_idx=*/-1, /*scale_grad_by_freq=*/false, sparse_grad);  // (B, T, H)
  }
  if (options.layer_outputs) out.layer_outputs.push_back(x);
  for (const auto& l : layers_) {
    x = checkpointed ? checkpointed_layer(l, x, cos, sin, shape) : decoder_layer(l, x, cos, sin, shape);
    if (options.layer_outputs) out.layer_outputs.push_back(x);
  }
  {
    RECORD_FUNCTION("ptk::norm", std::vector<c10::IValue>());
    out.hidden = rms_norm(x, norm_, c.rms_norm_eps);
  }
  if (options.logits) out.logits = logits(out.hidden);
  return out;
}

namespace {

// ---- cached decode attention -------------------------------------------------------------------
//
// One decode step attends row r's single query to keys [0, base[r] + 1) of its slot. On AVX-512
// CPUs (float32) each row reads its own keys only (decode_attention_rows, decode_attention_cpu.h:
// no padding). Elsewhere two layouts, both one batched op per layer whatever the set of slots:
//  - window: the slots' range [lo, hi] of the cache is read in place (a view, no copy); slots of
//    that range not in the batch compute a throwaway row (their queries are zero, they see key 0).
//    Cheap when the busy slots fill most of their range (continuous batching keeps them dense).
//  - gather: the rows' K/V windows [0, max_k) are copied out with index_select (R rows, no waste).
// The window costs ~n rows of attention, the gather ~2R (copy, then read), so the window is taken
// unless it holds over twice the rows (the engine's slot sets are dense). PTK_DECODE_ATTENTION=
// window|gather forces one of them (rollout_bench --decode-attention compares all three).
// Either way each row's scores are masked past its own length and the result equals the per-row
// attention up to float rounding.
struct DecodeBatch {
  at::Tensor slots, pos;  // (R) int64: each row's slot and the position its new token takes
  bool by_rows = false;   // decode_attention_rows over row_slots / lens; the fields below unused
  std::vector<int64_t> row_slots, lens;  // by rows: each row's slot and its key count
  bool window = true;
  int64_t lo = 0, n = 0;   // window: slots [lo, lo + n); gather: n = R
  int64_t max_k = 0;       // keys read per row
  at::Tensor rows;         // window: index of each row within [lo, lo + n)
  at::Tensor invisible;    // (n, max_k) bool: keys a row must not see
};

// `rows_supported`: decode_attention_rows can serve this model and cache.
DecodeBatch decode_batch(const std::vector<int64_t>& slots, const std::vector<int64_t>& base, int64_t max_k,
                         at::Device dev, bool rows_supported) {
  const int64_t R = static_cast<int64_t>(slots.size());
  DecodeBatch b;
  auto opt = at::TensorOptions().dtype(at::kLong);
  b.slots = at::tensor(slots, opt).to(dev);
  b.pos = at::tensor(base, opt).to(dev);
  const char* env = std::getenv("PTK_DECODE_ATTENTION");
  const std::string force = env ? env : "";
  if (rows_supported && force != "window" && force != "gather") {
    b.by_rows = true;
    b.row_slots = slots;
    for (int64_t r = 0; r < R; ++r) b.lens.push_back(base[r] + 1);
    return b;
  }
  const auto lo_hi = std::minmax_element(slots.begin(), slots.end());
  const int64_t lo = *lo_hi.first, n = *lo_hi.second - lo + 1;
  b.window = force == "window" ? true : force == "gather" ? false : n <= 2 * R;
  b.max_k = max_k;
  std::vector<int64_t> lens;  // keys visible to each computed row
  if (b.window) {
    b.lo = lo;
    b.n = n;
    lens.assign(static_cast<size_t>(n), 1);  // rows of idle slots: key 0 only (never all masked: no NaN)
    std::vector<int64_t> rows(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      rows[r] = slots[r] - lo;
      lens[rows[r]] = base[r] + 1;
    }
    b.rows = at::tensor(rows, opt).to(dev);
  } else {
    b.n = R;
    for (int64_t r = 0; r < R; ++r) lens.push_back(base[r] + 1);
  }
  b.invisible = at::arange(max_k, opt.device(dev)).unsqueeze(0) >= at::tensor(lens, opt).to(dev).unsqueeze(1);
  return b;
}

// q (R, nh, D) of one decode step; K/V the layer's cache (S, nkv, T_max, D), the step's keys
// already written. Returns (R, nh, D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& K, const at::Tensor& V, const DecodeBatch& b) {
  if (b.by_rows) return decode_attention_rows(q, K, V, b.row_slots, b.lens);
  const int64_t R = q.size(0), nh = q.size(1), D = q.size(2), nkv = K.size(1), g = nh / nkv, n = b.n;
  at::Tensor Kw, Vw, qw;
  if (b.window) {
    Kw = K.narrow(0, b.lo, n).narrow(2, 0, b.max_k);  // (n, nkv, max_k, D), a view
    Vw = V.narrow(0, b.lo, n).narrow(2, 0, b.max_k);
    qw = n == R ? q : at::zeros({n, nh, D}, q.options()).index_copy_(0, b.rows, q);
  } else {
    Kw = K.narrow(2, 0, b.max_k).index_select(0, b.slots);  // (R, nkv, max_k, D), a copy
    Vw = V.narrow(2, 0, b.max_k).index_select(0, b.slots);
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
  return b.window && n != R ? out.index_select(0, b.rows) : out;
}

}  // namespace

at::Tensor Qwen2Model::forward_cached(const at::Tensor& ids, const std::vector<int64_t>& slots,
                                      const std::vector<int64_t>& n_new, KVCache& cache,
                                      AttentionBackend backend, at::Tensor* logits_out,
                                      const PackedDecodeWeights* packed) const {
  at::NoGradGuard no_grad;
  const auto h = forward_cached_hidden(ids, slots, n_new, cache, backend, packed);  // (R, H)
  const auto& W = lm_head_weight();                                                 // (V, H)
  const PackedLinear* lm_head = packed && packed->lm_head ? &*packed->lm_head : nullptr;
  if (lm_head) {
    PTK_CHECK(lm_head->out_features() == W.size(0) && lm_head->in_features() == W.size(1),
              "forward_cached: the packed LM head is not this model's (" + std::to_string(lm_head->out_features()) +
                  " x " + std::to_string(lm_head->in_features()) + ")");
    at::Tensor local;
    return lm_head->forward_out(h, logits_out ? *logits_out : local);
  }
  if (!logits_out) return logits(h);  // (R, V)
  at::Tensor& out = *logits_out;
  if (!out.defined() || out.scalar_type() != h.scalar_type() || out.device() != h.device())
    out = at::empty({h.size(0), W.size(0)}, h.options());
  else
    out.resize_({h.size(0), W.size(0)});  // no reallocation while the storage is large enough
  return at::mm_out(out, h, W.t());
}

at::Tensor Qwen2Model::forward_cached_hidden(const at::Tensor& ids_in, const std::vector<int64_t>& slots,
                                             const std::vector<int64_t>& n_new, KVCache& cache,
                                             AttentionBackend backend, const PackedDecodeWeights* packed) const {
  at::NoGradGuard no_grad;
  const auto& c = config_;
  PTK_CHECK(ids_in.dim() == 2, "forward_cached: ids must be (R, T)");
  const int64_t R = ids_in.size(0), T = ids_in.size(1), D = c.head_dim, nh = c.num_attention_heads,
                nkv = c.num_key_value_heads;
  PTK_CHECK(static_cast<int64_t>(slots.size()) == R && static_cast<int64_t>(n_new.size()) == R,
            "forward_cached: slots and n_new need one entry per row of ids");
  PTK_CHECK(cache.num_layers() == c.num_hidden_layers, "forward_cached: the cache was built for another config");
  std::set<int64_t> distinct(slots.begin(), slots.end());
  PTK_CHECK(static_cast<int64_t>(distinct.size()) == R, "forward_cached: a slot appears twice in one call");
  bool all_decode = true;
  for (int64_t r = 0; r < R; ++r) {
    PTK_CHECK(n_new[r] >= 1 && n_new[r] <= T, "forward_cached: n_new[" + std::to_string(r) + "] = " +
                                                  std::to_string(n_new[r]) + " must be in [1, " + std::to_string(T) + "]");
    PTK_CHECK(cache.length(slots[r]) + n_new[r] <= cache.max_len(),
              "forward_cached: slot " + std::to_string(slots[r]) + " holds " + std::to_string(cache.length(slots[r])) +
                  " tokens; " + std::to_string(n_new[r]) + " more exceed max_len " + std::to_string(cache.max_len()) +
                  "\n---> HINT: raise the cache's max_len (prompt + max_new_tokens).");
    if (n_new[r] != 1) all_decode = false;
  }
  auto dev = embed_tokens_.device();
  auto ids = ids_in.to(dev, at::kLong);
  std::vector<int64_t> base(R);
  for (int64_t r = 0; r < R; ++r) base[r] = cache.length(slots[r]);
  auto positions = at::tensor(base, at::kLong).to(dev).unsqueeze(1) + at::arange(T, ids.options()).unsqueeze(0);
  auto [cos, sin] = rope_cos_sin(c, positions);  // (R, T, D)
  const bool fused = use_fused(backend, embed_tokens_);
  int64_t max_k = 0;
  for (int64_t r = 0; r < R; ++r) max_k = std::max(max_k, base[r] + n_new[r]);
  // Decode (one token per row) over any set of slots is one attention call per layer; see
  // decode_attention.
  DecodeBatch db;
  if (all_decode)
    db = decode_batch(slots, base, max_k, dev, decode_attention_rows_supported(embed_tokens_, cache.keys(0)));

  at::Tensor x = at::embedding(embed_tokens_, ids);  // (R, T, H)
  // Decode steps through the packed linears when given: x (R, 1, in) -> (R, 1, out).
  const bool packed_trunk = all_decode && T == 1 && packed && !packed->layers.empty();
  if (packed) PTK_CHECK(packed->layers.empty() || static_cast<int64_t>(packed->layers.size()) == c.num_hidden_layers,
                        "forward_cached: the packed weights are not this model's");
  auto lin = [&](const at::Tensor& in, const at::Tensor& w, const at::Tensor& b, const PackedLinear* p) {
    if (!p) return at::linear(in, w, b);
    at::Tensor y;
    p->forward_out(in.reshape({R, in.size(-1)}), y);
    if (b.defined()) y.add_(b);
    return y.view({R, 1, p->out_features()});
  };
  for (int64_t li = 0; li < c.num_hidden_layers; ++li) {
    const auto& l = layers_[li];
    const PackedDecodeWeights::Layer* pl = packed_trunk ? &packed->layers[li] : nullptr;
    auto h = rms_norm(x, l.input_layernorm, c.rms_norm_eps);
    auto q = apply_rope(lin(h, l.q_proj_w, l.q_proj_b, pl ? &pl->q : nullptr).view({R, T, nh, D}).transpose(1, 2),
                        cos, sin);
    auto k = apply_rope(lin(h, l.k_proj_w, l.k_proj_b, pl ? &pl->k : nullptr).view({R, T, nkv, D}).transpose(1, 2),
                        cos, sin);
    auto v = lin(h, l.v_proj_w, l.v_proj_b, pl ? &pl->v : nullptr).view({R, T, nkv, D}).transpose(1, 2);
    auto K = cache.keys(li), V = cache.values(li);  // (S, nkv, T_max, D)
    at::Tensor a;                                   // (R, nh, T, D)
    if (all_decode) {
      // One scatter per layer: position base[r] of slot slots[r] gets row r's key / value.
      K.index_put_({db.slots, torch::indexing::Slice(), db.pos}, k.select(2, 0));
      V.index_put_({db.slots, torch::indexing::Slice(), db.pos}, v.select(2, 0));
      a = decode_attention(q.select(2, 0), K, V, db).unsqueeze(2);
    } else {
      for (int64_t r = 0; r < R; ++r) {
        K[slots[r]].narrow(1, base[r], n_new[r]).copy_(k[r].narrow(1, 0, n_new[r]));
        V[slots[r]].narrow(1, base[r], n_new[r]).copy_(v[r].narrow(1, 0, n_new[r]));
      }
      std::vector<at::Tensor> rows;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t lk = base[r] + n_new[r];
        auto o = attend(q[r].narrow(1, 0, n_new[r]), K[slots[r]].narrow(1, 0, lk), V[slots[r]].narrow(1, 0, lk), fused);
        if (n_new[r] < T) o = at::cat({o, at::zeros({nh, T - n_new[r], D}, o.options())}, 1);
        rows.push_back(o);
      }
      a = at::stack(rows, 0);
    }
    a = a.transpose(1, 2).reshape({R, T, nh * D});
    x = x + lin(a, l.o_proj_w, {}, pl ? &pl->o : nullptr);
    h = rms_norm(x, l.post_attention_layernorm, c.rms_norm_eps);
    auto gate = at::silu(lin(h, l.gate_proj_w, {}, pl ? &pl->gate : nullptr));
    x = x + lin(gate * lin(h, l.up_proj_w, {}, pl ? &pl->up : nullptr), l.down_proj_w, {}, pl ? &pl->down : nullptr);
  }
  for (int64_t r = 0; r < R; ++r) cache.set_length(slots[r], base[r] + n_new[r]);
  auto last = at::tensor(n_new, at::kLong).to(dev) - 1;
  auto h_last = x.index({at::arange(R, ids.options()), last});  // (R, H)
  return rms_norm(h_last, norm_, c.rms_norm_eps);
}

PackedDecodeWeights Qwen2Model::pack_for_decode(bool lm_head, int64_t max_trunk_bytes) const {
  at::NoGradGuard no_grad;
  PackedDecodeWeights p;
  if (lm_head && PackedLinear::supported(lm_head_weight())) p.lm_head.emplace(lm_head_weight());
  auto linears = [](const Qwen2Layer& l) {
    return std::array<const at::Tensor*, 7>{&l.q_proj_w, &l.k_proj_w,    &l.v_proj_w,   &l.o_proj_w,
                                            &l.gate_proj_w, &l.up_proj_w, &l.down_proj_w};
  };
  int64_t bytes = 0;  // what the copy takes: float32, as PackedLinear::supported requires
  for (const auto& l : layers_)
    for (const at::Tensor* w : linears(l)) bytes += w->numel() * static_cast<int64_t>(sizeof(float));
  if (layers_.empty() || bytes > max_trunk_bytes || !PackedLinear::supported(layers_[0].q_proj_w)) return p;
  for (const auto& l : layers_) {
    const auto w = linears(l);
    p.layers.push_back({PackedLinear(*w[0]), PackedLinear(*w[1]), PackedLinear(*w[2]), PackedLinear(*w[3]),
                        PackedLinear(*w[4]), PackedLinear(*w[5]), PackedLinear(*w[6])});
  }
  return p;
}

void Qwen2Model::save_pretrained(const std::string& dir, const checkpoint::SaveOptions& options) const {
  checkpoint::save_checkpoint(dir, config_, named_parameters(), options);
}

}  // namespace ptk::model
