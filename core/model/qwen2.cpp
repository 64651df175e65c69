// Qwen2 forward (packed / padded / cached), loading, saving and random init. One decoder-layer body
// (layer_body) serves the training forward and the KV-cache forward; what differs is its attention
// step (AttentionStep: segments of rows vs the cache) and its linears (core/model/linear.h: plain,
// packed for decode, wrapped by an adapter). Kernels come from core/kernels/dispatch.h. Attention
// stays inside each document: short documents of packed rows are batched by padding (see
// PackedPlan), the others run one causal attention each; on CUDA, packed bf16 rows go to varlen flash.
// Not the loss and not sampling (see the trainer's chunked loss op and rollout/).
#include "core/model/qwen2.h"

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <mutex>
#include <set>

#include "core/kernels/cpu/causal_attention.h"
#include "core/kernels/cpu/cpu_features.h"
#include "core/kernels/cpu/decode_attention_cpu.h"
#include "core/kernels/cuda/attention.h"
#include "core/kernels/dispatch.h"
#include "core/kernels/ref/attention.h"
#include "core/model/kv_cache.h"
#include "core/model/lora.h"
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

// The attention kernel a forward uses (kernels::select_attention) and cpu_block's block size.
struct AttentionKernel {
  kernels::Attention kind = kernels::Attention::kRef;
  int64_t block_rows = 128;
};

AttentionKernel attention_kernel(AttentionBackend backend, const at::Tensor& like, int64_t head_dim, bool packed) {
  kernels::Options o = kernels::options();
  if (backend == AttentionBackend::kFused) o.attention = kernels::Attention::kSdpa;
  kernels::AttentionCall call{like.device().type(), like.scalar_type(), head_dim, packed, kernels::cpu::cpu_has_avx512f()};
  AttentionKernel k{kernels::select_attention(call, o), kernels::attention_block_rows(o)};
  if (backend == AttentionBackend::kExact &&
      (k.kind == kernels::Attention::kSdpa || k.kind == kernels::Attention::kFlashVarlen)) {
    o.attention = kernels::Attention::kAuto;
    call.device = at::kCPU;  // ptk's own kernels where they serve (CPU float32), else the reference
    k.kind = like.is_cpu() ? kernels::select_attention(call, o) : kernels::Attention::kRef;
    if (k.kind == kernels::Attention::kSdpa || k.kind == kernels::Attention::kFlashVarlen) k.kind = kernels::Attention::kRef;
  }
  return k;
}

// Causal attention of one batch of documents: q (N, heads, Lq, D) or (heads, Lq, D), k/v with
// kv_heads; the queries are the last Lq of the Lk positions. (flash_varlen works on whole packed
// rows, not here: per-document calls take SDPA.)
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionKernel& kern) {
  using kernels::Attention;
  const bool batched = q.dim() == 4;
  auto four = [&](auto&& f) { return batched ? f(q, k, v) : f(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)).squeeze(0); };
  switch (kern.kind) {
    case Attention::kSdpa:
    case Attention::kFlashVarlen:
      return kernels::cuda::sdpa_causal_attention(q, k, v);
    case Attention::kCpuFlash:
      if (kernels::cpu::causal_flash_attention_supported(q, k, v))
        return four([](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
          return kernels::cpu::causal_flash_attention(a, b, c);
        });
      [[fallthrough]];
    case Attention::kCpuBlock:
      if (q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat)
        return four([&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
          return kernels::cpu::causal_block_attention(a, b, c, kern.block_rows);
        });
      [[fallthrough]];
    default:
      return kernels::ref::causal_attention(q, k, v);
  }
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

// The embedding lookup: at::embedding, or on the `meta` device the same rows through index_rows.
at::Tensor embed(const at::Tensor& weight, const at::Tensor& ids, bool sparse_grad) {
  if (weight.is_meta()) {
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(weight.size(1));
    return kernels::ref::index_rows(weight, ids.reshape({-1})).view(shape);
  }
  return at::embedding(weight, ids, /*padding_idx=*/-1, /*scale_grad_by_freq=*/false, sparse_grad);
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
  return rope_cos_sin(inv_freq.to(positions.device()), scale, positions);
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, double scale, const at::Tensor& positions) {
  auto freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // (P..., D/2)
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
  if (checkpoint::is_adapter_folder(dir)) return load_merged_adapter(dir, options);
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
  return map_weights([](const at::Tensor& t) { return t.detach().clone(); });
}

Qwen2Model Qwen2Model::map_weights(const std::function<at::Tensor(const at::Tensor&)>& f) const {
  Qwen2Model m = *this;
  m.adapters_.clear();  // the adapters' tensors are not mapped: a copy that kept them would share them
  std::map<std::string, at::Tensor> mapped;
  for (const auto& [name, t] : named_parameters()) mapped[name] = f(t);
  assign_all(m, config_.num_hidden_layers, lm_head_.defined(), score_.defined(),
             [&](const std::string& name) { return mapped.at(name); });
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
  return kernels::ref::index_rows(at::cat({x, at::zeros(one, x.options())}, 0), idx);
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
// checkpointed backward rebuilds the forward's plan. kernels.packed_attention = per_document
// (PTK_PACKED_ATTENTION=per-document) forces null.
std::shared_ptr<const PackedPlan> plan_packed(const std::vector<std::vector<Segment>>& segs, int64_t B, int64_t T,
                                              int64_t nh, at::Device device) {
  if (kernels::select_packed_attention(kernels::options()) == kernels::PackedAttention::kPerDocument) return nullptr;
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

// What a decoder layer's training attention needs: head layout, norm epsilon, attention kernel,
// and the row segments (documents / unpadded spans) attention stays inside.
struct LayerShape {
  int64_t nh, nkv, D;
  double eps;
  AttentionKernel kernel;
  bool simple;  // every row is one segment from position 0: one batched causal attention
  std::vector<std::vector<Segment>> segs;
  std::shared_ptr<const PackedPlan> packed;  // !simple: the padded batches (plan_packed), or null
  // kernel flash_varlen (!simple): every row's documents, and the runs of positions in no document,
  // end to end over the (B T) positions: offsets (runs + 1) int32 on the device, longest run.
  at::Tensor cu_seqlens;
  int64_t max_len = 0;
  const std::vector<LayerAdapters>* adapters = nullptr;  // the model's, or null
};

// Fills the per-forward plan of a shape whose segments are set: padded batches, or cu_seqlens.
void plan_attention(LayerShape& s, int64_t B, int64_t T, at::Device device) {
  if (s.simple) return;
  if (s.kernel.kind != kernels::Attention::kFlashVarlen) {
    s.packed = plan_packed(s.segs, B, T, s.nh, device);
    return;
  }
  std::vector<int32_t> cu{0};
  int64_t max_len = 0;
  auto run = [&](int64_t len) {
    if (len <= 0) return;
    cu.push_back(static_cast<int32_t>(cu.back() + len));
    max_len = std::max(max_len, len);
  };
  // Positions in no document (padding; outputs unused) as sequences of one token each: a padded tail
  // attended as one sequence would cost as much as a real document of its length.
  auto pad = [&](int64_t len) {
    for (int64_t i = 0; i < len; ++i) run(1);
  };
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    for (const auto& g : s.segs[b]) {
      pad(g.start - t);
      run(g.len);
      t = g.start + g.len;
    }
    pad(T - t);
  }
  s.cu_seqlens = at::tensor(cu, at::kInt).to(device, /*non_blocking=*/true);
  s.max_len = max_len;
}

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

// ---- the one decoder-layer body ------------------------------------------------------------------

// A layer's seven linears as the body calls them.
struct LayerLinears {
  Linear q, k, v, o, gate, up, down;
};
LayerLinears linears_of(const Qwen2Layer& l, const PackedDecodeWeights::Layer* p, const LayerAdapters* a) {
  auto ad = [&](LinearId id) { return a ? (*a)[static_cast<size_t>(id)].get() : nullptr; };
  return {{&l.q_proj_w, &l.q_proj_b, p ? &p->q : nullptr, ad(LinearId::kQ)},
          {&l.k_proj_w, &l.k_proj_b, p ? &p->k : nullptr, ad(LinearId::kK)},
          {&l.v_proj_w, &l.v_proj_b, p ? &p->v : nullptr, ad(LinearId::kV)},
          {&l.o_proj_w, nullptr, p ? &p->o : nullptr, ad(LinearId::kO)},
          {&l.gate_proj_w, nullptr, p ? &p->gate : nullptr, ad(LinearId::kGate)},
          {&l.up_proj_w, nullptr, p ? &p->up : nullptr, ad(LinearId::kUp)},
          {&l.down_proj_w, nullptr, p ? &p->down : nullptr, ad(LinearId::kDown)}};
}
const LayerAdapters* adapters_at(const std::vector<LayerAdapters>* all, size_t layer) {
  return all && layer < all->size() ? &(*all)[layer] : nullptr;
}

// The attention step of a layer: q (B, nh, T, D) after RoPE, k (B, nkv, T, D) after RoPE, v
// (B, nkv, T, D) -> (B, nh, T, D).
class AttentionStep {
 public:
  virtual ~AttentionStep() = default;
  virtual at::Tensor operator()(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const = 0;
};

// x (B, T, H) -> (B, T, H): norm -> q/k/v -> RoPE -> attention -> o_proj -> norm -> MLP, both
// residuals. cos/sin (B, T, D) float32. The scopes name the phases in a profile
// (bench/train_step_bench); free when no profiler runs.
at::Tensor layer_body(const Qwen2Layer& l, const LayerLinears& lin, const at::Tensor& x_in, const at::Tensor& cos,
                      const at::Tensor& sin, double eps, int64_t nh, int64_t nkv, int64_t D, int64_t layer,
                      const AttentionStep& attention) {
  const int64_t B = x_in.size(0), T = x_in.size(1);
  at::Tensor h, q, k, v, a, x;
  {
    RECORD_FUNCTION("ptk::norm", std::vector<c10::IValue>());
    h = rms_norm(x_in, l.input_layernorm, eps);
  }
  {
    RECORD_FUNCTION("ptk::qkv_proj", std::vector<c10::IValue>());
    q = lin.q(h).view({B, T, nh, D}).transpose(1, 2);   // (B, nh, T, D)
    k = lin.k(h).view({B, T, nkv, D}).transpose(1, 2);  // (B, nkv, T, D)
    v = lin.v(h).view({B, T, nkv, D}).transpose(1, 2);  // (B, nkv, T, D)
  }
  {
    RECORD_FUNCTION("ptk::rope", std::vector<c10::IValue>());
    q = apply_rope(q, cos, sin);
    k = apply_rope(k, cos, sin);
  }
  {
    RECORD_FUNCTION("ptk::attention", std::vector<c10::IValue>());
    a = attention(layer, q, k, v);
  }
  {
    RECORD_FUNCTION("ptk::o_proj", std::vector<c10::IValue>());
    a = a.transpose(1, 2).reshape({B, T, nh * D});
    x = x_in + lin.o(a);
  }
  {
    RECORD_FUNCTION("ptk::norm", std::vector<c10::IValue>());
    h = rms_norm(x, l.post_attention_layernorm, eps);
  }
  RECORD_FUNCTION("ptk::mlp", std::vector<c10::IValue>());
  return x + lin.down(at::silu(lin.gate(h)) * lin.up(h));
}

// Training attention: causal inside each row segment (LayerShape).
class SegmentAttention : public AttentionStep {
 public:
  explicit SegmentAttention(const LayerShape& s) : s_(s) {}
  at::Tensor operator()(int64_t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const override {
    const auto& s = s_;
    const int64_t B = q.size(0), T = q.size(2), nh = s.nh, nkv = s.nkv, D = s.D;
    if (s.simple) return attend(q, k, v, s.kernel);  // one document per row from position 0: the row's causal mask
    auto flat = [&](const at::Tensor& t, int64_t heads) { return t.transpose(1, 2).reshape({B * T, heads, D}); };
    if (s.kernel.kind == kernels::Attention::kFlashVarlen) {
      // Every document (and every run of padding) of every row in one call: (B T, heads, D).
      auto o = kernels::cuda::flash_varlen_attention(flat(q, nh), flat(k, nkv), flat(v, nkv), s.cu_seqlens, s.max_len);
      return o.view({B, T, nh, D}).transpose(1, 2);
    }
    if (s.packed) {
      // Flat (B T, heads, D) rows -> padded batches -> one attention each -> back to (B, nh, T, D).
      const auto& P = *s.packed;
      const auto qf = flat(q, nh), kf = flat(k, nkv), vf = flat(v, nkv);
      std::vector<at::Tensor> parts;
      for (const auto& d : P.batches) {
        RECORD_FUNCTION("ptk::attention_padded_batch", std::vector<c10::IValue>());
        auto pad = [&](const at::Tensor& f, int64_t heads) {
          return SelectRows::apply(f, d.gather, d.gather_inv).view({d.n, d.L, heads, D}).transpose(1, 2);
        };
        auto o = attend(pad(qf, nh), pad(kf, nkv), pad(vf, nkv), s.kernel);  // (n, nh, L, D)
        parts.push_back(o.transpose(1, 2).reshape({d.n * d.L, nh, D}));
      }
      for (const auto& [b, g] : P.alone) {
        RECORD_FUNCTION("ptk::attention_alone_document", std::vector<c10::IValue>());
        parts.push_back(attend(q[b].narrow(1, g.start, g.len), k[b].narrow(1, g.start, g.len),
                               v[b].narrow(1, g.start, g.len), s.kernel)
                            .transpose(0, 1));  // (len, nh, D)
      }
      auto rows = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
      return SelectRows::apply(rows, P.scatter, P.scatter_inv).view({B, T, nh, D}).transpose(1, 2);
    }
    std::vector<at::Tensor> rows;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<at::Tensor> parts;
      int64_t t = 0;
      for (const auto& g : s.segs[b]) {
        if (g.start > t) parts.push_back(at::zeros({nh, g.start - t, D}, q.options()));
        parts.push_back(attend(q[b].narrow(1, g.start, g.len), k[b].narrow(1, g.start, g.len),
                               v[b].narrow(1, g.start, g.len), s.kernel));
        t = g.start + g.len;
      }
      if (t < T) parts.push_back(at::zeros({nh, T - t, D}, q.options()));
      rows.push_back(parts.size() == 1 ? parts[0] : at::cat(parts, 1));
    }
    return at::stack(rows, 0);  // (B, nh, T, D)
  }

 private:
  const LayerShape& s_;
};

// One training decoder layer (the plain and the checkpointed paths run this).
at::Tensor decoder_layer(const Qwen2Layer& l, const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                         const LayerShape& s, int64_t layer) {
  return layer_body(l, linears_of(l, nullptr, adapters_at(s.adapters, static_cast<size_t>(layer))), x_in, cos, sin,
                    s.eps, s.nh, s.nkv, s.D, layer, SegmentAttention(s));
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The adapters of one layer as a checkpointed layer's saved data (an IValue capsule).
struct SavedAdapters : torch::CustomClassHolder {
  LayerAdapters adapters;
};

// The layer's adapters' tensors, appended after its kLayerTensors parameters; `counts` gets how many
// each of the seven linears contributed.
std::vector<at::Tensor> adapter_tensors(const LayerAdapters* a, std::vector<int64_t>* counts) {
  std::vector<at::Tensor> out;
  counts->assign(kLayerLinears, 0);
  if (!a) return out;
  for (size_t i = 0; i < kLayerLinears; ++i) {
    if (!(*a)[i]) continue;
    auto p = (*a)[i]->parameters();
    (*counts)[i] = static_cast<int64_t>(p.size());
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

bool any_stochastic(const LayerAdapters* a) {
  if (!a) return false;
  for (const auto& x : *a)
    if (x && x->stochastic()) return true;
  return false;
}

// The default generator's state of `device`, or sets it (dropout in adapters draws from it). Devices
// without a generator (meta) draw nothing: undefined.
at::Tensor generator_state(const at::Device& device) {
  if (!device.is_cpu() && !device.is_cuda()) return at::Tensor();
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
void set_generator_state(const at::Device& device, const at::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Activation checkpointing for one decoder layer (what torch.utils.checkpoint does, which LibTorch
// C++ lacks): forward runs decoder_layer without recording a graph and keeps only its input;
// backward runs it again with grad on and back-propagates into the input and the parameters.
// Saved per layer: x (B, T, H) instead of every intermediate (~37 x (B, T, H) plus the attention
// probabilities); cost: one more forward of the layer during backward. Linear adapters (LoRA) pass
// their tensors in after the layer's own, so they get gradients; an adapter that draws random
// numbers (dropout) has the generator's state replayed for the recomputation (torch.utils.checkpoint's
// preserve_rng_state), so both passes draw the same masks.
struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  // Inputs in edge order: x, cos, sin, then the kLayerTensors parameters and the adapters' tensors;
  // `shape` is not a tensor.
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::Tensor cos, at::Tensor sin,
                               at::TensorList params, const LayerShape& shape, int64_t layer) {
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
    ctx->saved_data["kernel"] = std::vector<int64_t>{static_cast<int64_t>(shape.kernel.kind), shape.kernel.block_rows};
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["simple"] = shape.simple;
    ctx->saved_data["segs"] = segs;
    const LayerAdapters* a = adapters_at(shape.adapters, static_cast<size_t>(layer));
    if (a) {
      auto holder = c10::make_intrusive<SavedAdapters>();
      holder->adapters = *a;
      ctx->saved_data["adapters"] = c10::IValue::make_capsule(std::move(holder));
      if (any_stochastic(a))
        if (at::Tensor state = generator_state(x.device()); state.defined()) ctx->saved_data["rng"] = state;
    }
    return {decoder_layer(layer_from(std::vector<at::Tensor>(params.begin(), params.begin() + kLayerTensors)), x, cos,
                          sin, shape, layer)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto heads = ctx->saved_data["heads"].toIntVector();
    auto kernel = ctx->saved_data["kernel"].toIntVector();
    LayerShape shape{heads[0],
                     heads[1],
                     heads[2],
                     ctx->saved_data["eps"].toDouble(),
                     {static_cast<kernels::Attention>(kernel[0]), kernel[1]},
                     ctx->saved_data["simple"].toBool(),
                     {},
                     nullptr};
    const int64_t layer = ctx->saved_data["layer"].toInt();
    auto segs = ctx->saved_data["segs"].toIntVector();
    for (size_t i = 0; i < segs.size();) {
      std::vector<Segment> row(static_cast<size_t>(segs[i++]));
      for (auto& g : row) g = {segs[i], segs[i + 1]}, i += 2;
      shape.segs.push_back(std::move(row));
    }
    // The forward's padded batches (or cu_seqlens), rebuilt from the segments (deterministic).
    plan_attention(shape, saved[0].size(0), saved[0].size(1), saved[0].device());
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
    variable_list out(saved.size() + 2);  // + the non-tensor shape and layer arguments
    if (wanted.empty()) return out;
    // The layer's adapters again, over the fresh leaves of their tensors.
    std::vector<LayerAdapters> rebuilt;
    auto found = ctx->saved_data.find("adapters");
    if (found != ctx->saved_data.end()) {
      auto holder = c10::static_intrusive_pointer_cast<SavedAdapters>(found->second.toCapsule());
      rebuilt.resize(static_cast<size_t>(layer) + 1);
      size_t next = 3 + kLayerTensors;
      for (size_t i = 0; i < kLayerLinears; ++i) {
        const auto& a = holder->adapters[i];
        if (!a) continue;
        const size_t n = a->parameters().size();
        // An adapter without tensors trains nothing: itself again.
        rebuilt.back()[i] = n == 0 ? a : a->with_parameters(std::vector<at::Tensor>(leaves.begin() + next, leaves.begin() + next + n));
        PTK_CHECK(rebuilt.back()[i] != nullptr, "activation checkpointing: a linear adapter without with_parameters()");
        next += n;
      }
      shape.adapters = &rebuilt;
    }
    auto rng = ctx->saved_data.find("rng");
    at::Tensor rng_now;
    if (rng != ctx->saved_data.end()) {
      rng_now = generator_state(saved[0].device());
      set_generator_state(saved[0].device(), rng->second.toTensor());
    }
    at::Tensor y;
    try {
      at::AutoGradMode grad_on(true);
      AdaptersTrainingScope training(true);
      y = decoder_layer(layer_from(std::vector<at::Tensor>(leaves.begin() + 3, leaves.begin() + 3 + kLayerTensors)),
                        leaves[0], leaves[1], leaves[2], shape, layer);
    } catch (...) {
      if (rng_now.defined()) set_generator_state(saved[0].device(), rng_now);
      throw;
    }
    if (rng_now.defined()) set_generator_state(saved[0].device(), rng_now);
    auto g = torch::autograd::grad({y}, wanted, {grads[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    for (size_t j = 0; j < wanted.size(); ++j) out[wanted_index[j]] = g[j];
    return out;
  }
};

at::Tensor checkpointed_layer(const Qwen2Layer& l, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const LayerShape& shape, int64_t layer) {
  auto params = layer_tensors(l);
  std::vector<int64_t> counts;
  auto extra = adapter_tensors(adapters_at(shape.adapters, static_cast<size_t>(layer)), &counts);
  params.insert(params.end(), extra.begin(), extra.end());
  return CheckpointedLayer::apply(x, cos, sin, at::TensorList(params), shape, layer)[0];
}

}  // namespace

ForwardOutput Qwen2Model::forward(const ForwardInput& in, const ForwardOptions& options) const {
  const auto& c = config_;
  PTK_CHECK(in.input_ids.defined() && in.input_ids.dim() == 2, "input_ids must be a (B, T) tensor");
  PTK_CHECK(!(in.attention_mask.defined() && !in.doc_lengths.empty()),
            "give either attention_mask (padded rows) or doc_lengths (packed rows), not both");
  const int64_t B = in.input_ids.size(0), T = in.input_ids.size(1), D = c.head_dim, nh = c.num_attention_heads,
                nkv = c.num_key_value_heads;
  // Checked where the ids are on the host (reading them back from a GPU would synchronise; the
  // `meta` device has no values).
  if (in.input_ids.is_cpu() && in.input_ids.numel() > 0) {
    auto ids_cpu = in.input_ids.to(at::kLong);
    int64_t lo = ids_cpu.min().item<int64_t>(), hi = ids_cpu.max().item<int64_t>();
    PTK_CHECK(lo >= 0 && hi < c.vocab_size, "input_ids hold token " + std::to_string(lo < 0 ? lo : hi) +
                                                " outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  }
  auto ids = in.input_ids.to(embed_tokens_.device(), at::kLong);
  bool simple = true;
  auto segs = segments_of(in, B, T, &simple);
  auto positions = in.positions.defined() ? in.positions.to(ids.device(), at::kLong)
                                          : default_positions(in, B, T, ids.options());
  PTK_CHECK(positions.sizes() == ids.sizes(), "positions has shape " + shape_str(positions.sizes()) +
                                                  ", input_ids " + shape_str(ids.sizes()));
  auto [cos, sin] = rope_cos_sin(c, positions);  // (B, T, D) float32
  LayerShape shape{nh, nkv, D, c.rms_norm_eps, attention_kernel(options.backend, embed_tokens_, D, !simple),
                   simple, std::move(segs), nullptr};
  shape.adapters = adapters_.empty() ? nullptr : &adapters_;
  plan_attention(shape, B, T, ids.device());  // once per forward
  // Checkpointing only pays when a graph is being recorded (not under NoGradGuard / evaluation).
  const bool checkpointed = options.activation_checkpointing && at::GradMode::is_enabled();
  AdaptersTrainingScope adapters_training_scope(at::GradMode::is_enabled());  // LoRA dropout while training

  ForwardOutput out;
  at::Tensor x;
  {
    RECORD_FUNCTION("ptk::embedding", std::vector<c10::IValue>());
    // Tied LM (no score head) on the CPU: the lm_head op's dense (V, H) gradient reaches this weight
    // too, and autograd adds a sparse (T rows) embedding gradient into it in place. A dense one would
    // be a zero-filled (V, H) tensor plus a full add: ~1 s a step at the 0.5B shape (train_step_bench).
    // On CUDA (and meta) the dense one: one fast kernel, no sparse-to-dense coalescing.
    const bool sparse_grad = config_.tie_word_embeddings && !score_.defined() && at::GradMode::is_enabled() &&
                             embed_tokens_.requires_grad() && kernels::sparse_embedding_grad(embed_tokens_.device().type());
    x = embed(embed_tokens_, ids, sparse_grad);  // (B, T, H)
  }
  if (options.layer_outputs) out.layer_outputs.push_back(x);
  for (size_t li = 0; li < layers_.size(); ++li) {
    const auto& l = layers_[li];
    const auto i = static_cast<int64_t>(li);
    x = checkpointed ? checkpointed_layer(l, x, cos, sin, shape, i) : decoder_layer(l, x, cos, sin, shape, i);
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

// ---- cached attention --------------------------------------------------------------------------
//
// One decode step attends row r's single query to keys [0, base[r] + 1) of its slot. On AVX-512
// CPUs (float32) each row reads its own keys only (kernels::cpu::decode_attention_rows: no
// padding); elsewhere the reference's batched layouts (kernels::ref::plan_decode: window / gather).
// kernels.decode_attention (PTK_DECODE_ATTENTION) forces one; rollout_bench --decode-attention
// compares them. Prefill rows attend one by one over their slot's history.
class CachedAttention : public AttentionStep {
 public:
  CachedAttention(KVCache& cache, const std::vector<int64_t>& slots, const std::vector<int64_t>& base,
                  const std::vector<int64_t>& n_new, bool all_decode, const AttentionKernel& prefill, at::Device dev,
                  const at::Tensor& like)
      : cache_(cache), slots_(slots), base_(base), n_new_(n_new), all_decode_(all_decode), prefill_(prefill) {
    if (!all_decode) return;
    const int64_t R = static_cast<int64_t>(slots.size());
    auto opt = at::TensorOptions().dtype(at::kLong);
    slot_t_ = at::tensor(slots, opt).to(dev);
    pos_t_ = at::tensor(base, opt).to(dev);
    for (int64_t r = 0; r < R; ++r) lens_.push_back(base[r] + 1);
    kernels::DecodeCall call{like.device().type(), like.scalar_type(),
                             kernels::cpu::decode_attention_rows_supported(like, cache.keys(0))};
    decode_ = kernels::select_decode_attention(call, kernels::options());
    if (decode_ != kernels::DecodeAttention::kRows) {
      int64_t max_k = 0;
      for (int64_t len : lens_) max_k = std::max(max_k, len);
      const int force = decode_ == kernels::DecodeAttention::kWindow ? 1 : decode_ == kernels::DecodeAttention::kGather ? 2 : 0;
      plan_ = kernels::ref::plan_decode(slots, lens_, max_k, dev, force);
    }
  }

  // Writes the rows' new keys / values into layer `li`'s cache, then attends.
  at::Tensor operator()(int64_t li, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const override {
    const int64_t R = q.size(0), T = q.size(2), nh = q.size(1), D = q.size(3);
    auto K = cache_.keys(li), V = cache_.values(li);  // (S, nkv, T_max, D)
    if (all_decode_) {
      // One scatter per layer: position base[r] of slot slots[r] gets row r's key / value.
      K.index_put_({slot_t_, torch::indexing::Slice(), pos_t_}, k.select(2, 0));
      V.index_put_({slot_t_, torch::indexing::Slice(), pos_t_}, v.select(2, 0));
      const auto q1 = q.select(2, 0);
      at::Tensor a = decode_ == kernels::DecodeAttention::kRows
                         ? kernels::cpu::decode_attention_rows(q1, K, V, slots_, lens_)
                         : kernels::ref::decode_attention(q1, K, V, plan_);
      return a.unsqueeze(2);
    }
    for (int64_t r = 0; r < R; ++r) {
      K[slots_[r]].narrow(1, base_[r], n_new_[r]).copy_(k[r].narrow(1, 0, n_new_[r]));
      V[slots_[r]].narrow(1, base_[r], n_new_[r]).copy_(v[r].narrow(1, 0, n_new_[r]));
    }
    const bool sdpa = prefill_.kind == kernels::Attention::kSdpa || prefill_.kind == kernels::Attention::kFlashVarlen;
    std::vector<at::Tensor> rows;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t lk = base_[r] + n_new_[r];
      auto qr = q[r].narrow(1, 0, n_new_[r]), kr = K[slots_[r]].narrow(1, 0, lk), vr = V[slots_[r]].narrow(1, 0, lk);
      auto o = sdpa ? kernels::cuda::sdpa_causal_attention(qr, kr, vr) : kernels::ref::prefill_attention(qr, kr, vr);
      if (n_new_[r] < T) o = at::cat({o, at::zeros({nh, T - n_new_[r], D}, o.options())}, 1);
      rows.push_back(o);
    }
    return at::stack(rows, 0);
  }

 private:
  KVCache& cache_;
  const std::vector<int64_t>& slots_;
  const std::vector<int64_t>& base_;
  const std::vector<int64_t>& n_new_;
  bool all_decode_;
  AttentionKernel prefill_;
  at::Tensor slot_t_, pos_t_;  // decode: (R) int64 each row's slot and the position its new token takes
  std::vector<int64_t> lens_;  // decode: each row's key count
  kernels::DecodeAttention decode_ = kernels::DecodeAttention::kRows;
  kernels::ref::DecodePlan plan_;
};

// Decode over slots [0, n) for Qwen2Model::decode_step: row r's key / value go to position
// positions[r] of slot r (one scatter per layer), and its query attends the slot's keys [0,
// positions[r]] through SDPA. The G = heads / kv_heads query heads of one kv head are laid out as
// G query rows of that head, so SDPA reads the cache view (n, kv, T_max, D) as it is: no repeat of
// K / V, no gather.
class SlotDecodeAttention : public AttentionStep {
 public:
  SlotDecodeAttention(KVCache& cache, const at::Tensor& positions, int64_t kv_len)
      : cache_(cache), n_(positions.size(0)), len_(kv_len) {
    mask_ = at::arange(len_, positions.options()).unsqueeze(0).le(positions.unsqueeze(1)).view({n_, 1, 1, len_});
    pos_ = positions.reshape({n_, 1, 1, 1});
  }
  at::Tensor operator()(int64_t li, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) const override {
    const int64_t nh = q.size(1), nkv = k.size(1), D = q.size(3);
    // (n, nkv, kv_len, D): views of the cache's first kv_len positions (strided, no copy).
    auto K = cache_.keys(li).narrow(0, 0, n_).narrow(2, 0, len_), V = cache_.values(li).narrow(0, 0, n_).narrow(2, 0, len_);
    const auto idx = pos_.expand({n_, nkv, 1, D});
    K.scatter_(2, idx, k);  // k, v (n, nkv, 1, D)
    V.scatter_(2, idx, v);
    auto qg = q.reshape({n_, nkv, nh / nkv, D});  // query head h reads kv head h / G, as repeat_kv
    auto o = at::scaled_dot_product_attention(qg, K, V, mask_);  // (n, nkv, G, D)
    return o.reshape({n_, nh, 1, D});
  }

 private:
  KVCache& cache_;
  int64_t n_, len_;
  at::Tensor mask_;  // (n, 1, 1, kv_len) bool: key t visible to row r when t <= positions[r]
  at::Tensor pos_;   // (n, 1, 1, 1)
};

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
  // Decode (one token per row) over any set of slots is one attention call per layer; see
  // CachedAttention.
  const CachedAttention attention(cache, slots, base, n_new, all_decode,
                                  attention_kernel(backend, embed_tokens_, D, /*packed=*/false), dev, embed_tokens_);

  at::Tensor x = embed(embed_tokens_, ids, false);  // (R, T, H)
  // Decode steps through the packed linears when given: x (R, 1, in) -> (R, 1, out).
  const bool packed_trunk = all_decode && T == 1 && packed && !packed->layers.empty();
  if (packed) PTK_CHECK(packed->layers.empty() || static_cast<int64_t>(packed->layers.size()) == c.num_hidden_layers,
                        "forward_cached: the packed weights are not this model's");
  for (int64_t li = 0; li < c.num_hidden_layers; ++li) {
    const auto& l = layers_[li];
    const auto lin = linears_of(l, packed_trunk ? &packed->layers[li] : nullptr,
                                adapters_at(adapters_.empty() ? nullptr : &adapters_, static_cast<size_t>(li)));
    x = layer_body(l, lin, x, cos, sin, c.rms_norm_eps, nh, nkv, D, li, attention);
  }
  for (int64_t r = 0; r < R; ++r) cache.set_length(slots[r], base[r] + n_new[r]);
  auto last = at::tensor(n_new, at::kLong).to(dev) - 1;
  auto h_last = x.index({at::arange(R, ids.options()), last});  // (R, H)
  return rms_norm(h_last, norm_, c.rms_norm_eps);
}

at::Tensor Qwen2Model::decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& inv_freq,
                                  double rope_scale, KVCache& cache, int64_t kv_len) const {
  at::NoGradGuard no_grad;
  const auto& c = config_;
  const int64_t n = ids.size(0);
  PTK_CHECK(ids.dim() == 1 && positions.dim() == 1 && positions.size(0) == n && n >= 1 && n <= cache.slots(),
            "decode_step: ids and positions must be (n) with 1 <= n <= the cache's slots");
  PTK_CHECK(cache.num_layers() == c.num_hidden_layers, "decode_step: the cache was built for another config");
  if (kv_len == 0) kv_len = cache.max_len();
  PTK_CHECK(kv_len >= 1 && kv_len <= cache.max_len(), "decode_step: kv_len outside [1, max_len]");
  // RoPE from the device positions: (n, 1, D).
  auto [cos, sin] = rope_cos_sin(inv_freq, rope_scale, positions.view({n, 1}));
  const SlotDecodeAttention attention(cache, positions, kv_len);
  at::Tensor x = embed(embed_tokens_, ids.unsqueeze(1), false);  // (n, 1, H)
  for (int64_t li = 0; li < c.num_hidden_layers; ++li) {
    const auto& l = layers_[li];
    const auto lin = linears_of(l, nullptr, adapters_at(adapters_.empty() ? nullptr : &adapters_, static_cast<size_t>(li)));
    x = layer_body(l, lin, x, cos, sin, c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim, li,
                   attention);
  }
  return logits(rms_norm(x.select(1, 0), norm_, c.rms_norm_eps));  // (n, V)
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

// ---- linears and adapters ---------------------------------------------------------------------

namespace {
thread_local bool g_adapters_training = false;
}
bool adapters_training() { return g_adapters_training; }
AdaptersTrainingScope::AdaptersTrainingScope(bool on) : previous_(g_adapters_training) { g_adapters_training = on; }
AdaptersTrainingScope::~AdaptersTrainingScope() { g_adapters_training = previous_; }

const char* linear_name(LinearId id) {
  static const char* names[kLayerLinears] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                             "mlp.down_proj"};
  return names[static_cast<size_t>(id)];
}

at::Tensor Linear::operator()(const at::Tensor& x) const {
  at::Tensor y;
  if (packed) {
    at::Tensor flat;
    packed->forward_out(x.reshape({-1, x.size(-1)}), flat);
    if (bias) flat.add_(*bias);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = packed->out_features();
    y = flat.view(shape);
  } else {
    y = bias ? at::linear(x, *weight, *bias) : at::linear(x, *weight);
  }
  return adapter ? adapter->forward(x, y) : y;
}

void Qwen2Model::set_adapter(int64_t layer, LinearId which, std::shared_ptr<const LinearAdapter> adapter) {
  PTK_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()),
            "set_adapter: layer " + std::to_string(layer) + " outside [0, " + std::to_string(layers_.size()) + ")");
  if (adapters_.empty()) adapters_.resize(layers_.size());
  adapters_[static_cast<size_t>(layer)][static_cast<size_t>(which)] = std::move(adapter);
  bool any = false;
  for (const auto& l : adapters_)
    for (const auto& a : l) any = any || a != nullptr;
  if (!any) adapters_.clear();
}

void Qwen2Model::clear_adapters() { adapters_.clear(); }

const LinearAdapter* Qwen2Model::adapter(int64_t layer, LinearId which) const {
  if (layer < 0 || layer >= static_cast<int64_t>(adapters_.size())) return nullptr;
  return adapters_[static_cast<size_t>(layer)][static_cast<size_t>(which)].get();
}

}  // namespace ptk::model
