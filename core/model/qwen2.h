// The Qwen2 / Qwen2.5 decoder in LibTorch, numerically matching HF transformers' Qwen2ForCausalLM
// (and the score head of Qwen2ForSequenceClassification): RMSNorm, RoPE (rotate_half layout,
// optional static YaRN), grouped-query attention with q/k/v bias, SwiGLU MLP, tied embeddings.
// Not a trainer, not a loss (a later op computes it chunked from hidden states), not a sampler.
//
// Parameters are plain named at::Tensor fields (no torch::nn::Module): named_parameters() lists
// them under their HF names, which is what the optimizer and the checkpoint writer use.
//
// Threading and ownership: a Qwen2Model is a handle to its tensors. Copying the struct shares the
// tensors (cheap, aliasing); clone() is the deep copy (e.g. a frozen DPO reference). forward() does
// not modify the model and may run on several threads at once; changing parameters (optimizer
// steps) while another thread runs forward is the caller's race.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint/checkpoint.h"  // NamedTensors, SaveOptions
#include "core/checkpoint/hf_config.h"   // Qwen2Config
#include "core/model/linear.h"              // LinearId, LinearAdapter

namespace ptk::model {

using checkpoint::Qwen2Config;

class KVCache;               // core/model/kv_cache.h
struct PackedDecodeWeights;  // core/model/packed_linear.h

struct Qwen2Layer {
  at::Tensor input_layernorm;           // (H)
  at::Tensor q_proj_w, q_proj_b;        // (heads*D, H), (heads*D)
  at::Tensor k_proj_w, k_proj_b;        // (kv_heads*D, H), (kv_heads*D)
  at::Tensor v_proj_w, v_proj_b;        // (kv_heads*D, H), (kv_heads*D)
  at::Tensor o_proj_w;                  // (H, heads*D), no bias
  at::Tensor post_attention_layernorm;  // (H)
  at::Tensor gate_proj_w, up_proj_w;    // (I, H)
  at::Tensor down_proj_w;               // (H, I)
};

// Which attention kernel runs (kept for source compatibility; core/kernels/dispatch.h decides, from
// the device, the dtype and the recipe's kernels.* options). kAuto: the dispatch's choice. kExact:
// never SDPA / varlen flash (ptk's own kernels, else the ATen reference). kFused: SDPA.
enum class AttentionBackend { kAuto, kExact, kFused };

// One batch. Rows hold either padded sequences (attention_mask) or packed documents
// (doc_lengths); give at most one of the two. Attention never crosses a document boundary and
// never attends to padding; no (T, T) mask over a whole row is ever built.
struct ForwardInput {
  at::Tensor input_ids;  // (B, T) int64
  // (B, T) int64. Undefined: derived. With attention_mask: cumsum(mask) - 1 (padding gets 1, as
  // HF generate). With doc_lengths: restarting at 0 in every document. With neither: 0..T-1.
  at::Tensor positions;
  // (B, T) {0,1} (any integer or bool dtype); each row's ones must be contiguous (left or right
  // padding). Undefined: every token is real.
  at::Tensor attention_mask;
  // Per row, the lengths of the documents packed into it from position 0 (cu_seqlens-style);
  // tokens past their sum are padding. Empty: not packed.
  std::vector<std::vector<int64_t>> doc_lengths;
  // With attention_mask: per row, {first real token, number of real tokens} (0 real tokens: an
  // all-padding row), host-side. The forward then plans attention from these instead of copying
  // the mask to the host (a device synchronisation on CUDA, impossible on the `meta` device); they
  // must describe the mask. Empty: read from the mask.
  std::vector<std::pair<int64_t, int64_t>> row_spans;
};

struct ForwardOptions {
  // true: return logits (B, T, V). false: only `hidden` (the final-norm output, lm_head's input),
  // so a chunked loss never materialises [tokens x vocab] logits.
  bool logits = true;
  // Also return the embedding output and every decoder layer's output (for reference tests).
  bool layer_outputs = false;
  AttentionBackend backend = AttentionBackend::kAuto;
  // Activation checkpointing per decoder layer: keep only each layer's input (B, T, H) and recompute
  // the layer in backward. Activation memory falls from ~40 (B, T, H) tensors plus the attention
  // probabilities per layer to one per layer (plus one layer's worth during backward), for about
  // one extra forward of compute. Gradients equal the plain path's. No effect without grad mode.
  bool activation_checkpointing = false;
};

struct ForwardOutput {
  at::Tensor logits;  // (B, T, V) when options.logits; rows at padding are not meaningful
  at::Tensor hidden;  // (B, T, H) output of the final RMSNorm
  // When options.layer_outputs: [0] embeddings, [1 + i] output of decoder layer i, each (B, T, H).
  std::vector<at::Tensor> layer_outputs;
};

struct LoadOptions {
  // Parameter dtype: float32 (bf16/f16 checkpoints upcast, exactly) or bfloat16 / float16 (kept).
  at::ScalarType dtype = at::kFloat;
  // Where the parameters live. Weights stay memory-mapped (zero-copy) only on CPU when the
  // checkpoint dtype equals `dtype`.
  at::Device device = at::kCPU;
};

class Qwen2Model {
 public:
  Qwen2Model() = default;

  // Loads a Hugging Face folder (config.json + model.safetensors or sharded index). Refuses a
  // missing, extra or mis-shaped tensor by name. Works for every Qwen2 / Qwen2.5 size. A PEFT
  // adapter folder loads as its base model with the adapter merged (core/model/lora.h).
  static Qwen2Model from_pretrained(const std::string& dir, const LoadOptions& options = {});
  // Random weights from a config alone (normal(0, initializer_range), zero biases, unit norms), as
  // transformers' _init_weights; seeded, so the same seed gives the same model.
  static Qwen2Model from_config(const Qwen2Config& config, uint64_t seed, const LoadOptions& options = {});

  const Qwen2Config& config() const { return config_; }
  bool has_score_head() const { return score_.defined(); }

  // (name, tensor) in HF names and save_pretrained order: model.embed_tokens.weight,
  // model.layers.{i}.*, model.norm.weight, then lm_head.weight (untied only) or score.weight.
  checkpoint::NamedTensors named_parameters() const;
  // Marks every parameter as requiring grad (or not).
  void set_requires_grad(bool on);
  // Makes this causal LM a reward model (HF Qwen2ForSequenceClassification, num_labels 1): a new
  // score.weight (1, H) drawn normal(0, initializer_range) from `seed` (transformers' _init_weights),
  // lm_head dropped, config.pad_token_id = pad_token_id (where score pooling stops; TRL sets it
  // from the tokenizer). Throws when the model already has a score head.
  void add_score_head(uint64_t seed, int64_t pad_token_id);
  // Deep copy (new storage); the copy has no grad, no shared tensors with this one and no adapters.
  Qwen2Model clone() const;
  // A copy whose every weight (those named_parameters() lists) is f(this model's weight), with no
  // adapters: e.g. the weights copied to another device or into host memory.
  Qwen2Model map_weights(const std::function<at::Tensor(const at::Tensor&)>& f) const;
  // Moves / casts every parameter.
  void to(at::Device device, at::ScalarType dtype);

  ForwardOutput forward(const ForwardInput& input, const ForwardOptions& options = {}) const;

  // lm_head over hidden states: (..., H) -> (..., V). Uses embed_tokens when tied.
  at::Tensor logits(const at::Tensor& hidden) const;
  const at::Tensor& lm_head_weight() const { return config_.tie_word_embeddings ? embed_tokens_ : lm_head_; }
  // Reward score (Qwen2ForSequenceClassification): score.weight applied to hidden[b, index[b]].
  // hidden (B, T, H), index (B) int64 -> (B). Throws when the folder has no score head.
  at::Tensor score(const at::Tensor& hidden, const at::Tensor& index) const;

  // Cached forward for generation: appends the first n_new[r] tokens of ids row r to cache slot
  // slots[r] (prefill when n_new > 1, decode when 1) at positions length(slot) + t, attends over
  // each slot's own history, advances the slot lengths, and returns the logits at each row's last
  // appended token: (R, V). ids (R, T) int64, T >= max(n_new). Throws when a slot would overflow.
  // With `logits_out`, the logits are written into that tensor (allocated on first use, resized in
  // place after: its storage is kept while R does not exceed the largest R seen) and the result is
  // a view of it, valid until the next call with the same buffer. A decode loop passes one buffer
  // for all its steps: at the 151,936-token vocabulary a 64-row step's logits are 39 MB, and a fresh
  // allocation of that size is a fresh mmap whose pages fault in on every step.
  // With `packed` (pack_for_decode of this model, made since its weights last changed), decode
  // calls use its packed linears and the logits its packed LM head; prefills use only the latter.
  // Not thread-safe with respect to `cache`.
  at::Tensor forward_cached(const at::Tensor& ids, const std::vector<int64_t>& slots,
                            const std::vector<int64_t>& n_new, KVCache& cache,
                            AttentionBackend backend = AttentionBackend::kAuto,
                            at::Tensor* logits_out = nullptr, const PackedDecodeWeights* packed = nullptr) const;
  // The same cached forward without the LM head: the final-normed hidden state at each row's last
  // appended token, (R, H). For prefills whose logits nobody reads.
  at::Tensor forward_cached_hidden(const at::Tensor& ids, const std::vector<int64_t>& slots,
                                   const std::vector<int64_t>& n_new, KVCache& cache,
                                   AttentionBackend backend = AttentionBackend::kAuto,
                                   const PackedDecodeWeights* packed = nullptr) const;
  // One decode step of fixed shape for a device-resident loop (rollout/device_loop.h): row r feeds
  // ids[r] to cache slot r (slots [0, n), n = ids.size(0)) at position positions[r], writes its key
  // and value there and attends to keys [0, positions[r]] of that slot (a mask built from the
  // positions on the device; grouped-query SDPA reading the cache in place, no K/V copies), reading
  // only the first kv_len positions of each slot (0 = all max_len; every row's position must be
  // below kv_len: the caller buckets it so that few shapes cover a generation). RoPE
  // from the device positions with inv_freq = rope_inv_freq(config()).first already on the model's
  // device and rope_scale its .second. Returns the logits (n, V) in the model's dtype.
  // Everything stays on the device: no host synchronisation, no host->device copy, shapes fixed by
  // n, kv_len and the cache, so a CUDA graph can capture it. Leaves the cache's host-side lengths alone (the
  // caller keeps them). Rows of idle slots need a valid id and a position < max_len (their output
  // is meaningless; their KV write lands in their own slot at that position). ids, positions (n)
  // int64 on the model's device; n <= cache.slots(). Adapters apply as in forward_cached; packed
  // weights are not used.
  at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& inv_freq,
                         double rope_scale, KVCache& cache, int64_t kv_len = 0) const;
  // Copies of this model's weights in model::PackedLinear's layout for forward_cached's decode
  // steps: the LM head when `lm_head`, every layer's linears when their copy takes at most
  // `max_trunk_bytes` (0: never), each only where PackedLinear::supported (float32 on an AVX-512
  // CPU). A snapshot: stale once the weights change.
  PackedDecodeWeights pack_for_decode(bool lm_head, int64_t max_trunk_bytes) const;

  // Wraps linear `which` of decoder layer `layer` with an adapter (null removes it): forward and
  // the cached forward then return adapter->forward(x, x W^T + b) for it. Copies of this handle
  // share the adapters; clone() drops them; activation checkpointing recomputes them (their
  // tensors get gradients through LinearAdapter::parameters/with_parameters).
  void set_adapter(int64_t layer, LinearId which, std::shared_ptr<const LinearAdapter> adapter);
  const LinearAdapter* adapter(int64_t layer, LinearId which) const;
  bool has_adapters() const { return !adapters_.empty(); }
  // Removes every adapter from this handle (other copies keep theirs).
  void clear_adapters();

  // Saves an HF folder that transformers and vLLM load unchanged (see checkpoint::save_checkpoint).
  void save_pretrained(const std::string& dir, const checkpoint::SaveOptions& options = {}) const;

  // Direct access for ops and LoRA later: (V, H), per-layer weights, (H), (V, H) / (1, H).
  at::Tensor embed_tokens_;
  std::vector<Qwen2Layer> layers_;
  at::Tensor norm_;
  at::Tensor lm_head_;  // undefined when tied
  at::Tensor score_;    // (1, H); defined only for Qwen2ForSequenceClassification

 private:
  Qwen2Config config_;
  std::vector<LayerAdapters> adapters_;  // empty: none
};

// ---- building blocks, exposed for tests and fused ops ------------------------------------------

// Inverse frequencies (D/2) float32, as transformers computes them (YaRN-scaled when configured),
// and the factor cos/sin are multiplied by (1 unless YaRN).
std::pair<at::Tensor, double> rope_inv_freq(const Qwen2Config& config);
// cos and sin tables for positions (any shape P...) -> (P..., D) float32, layout cat(freqs, freqs).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const Qwen2Config& config, const at::Tensor& positions);
// The same from rope_inv_freq's pair, inv_freq already on the positions' device (no host copy).
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, double scale, const at::Tensor& positions);
// x*cos + rotate_half(x)*sin. x (B, heads, T, D); cos/sin (B, T, D).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// Derived positions for an attention mask: cumsum(mask) - 1, padding set to 1 (HF generate). (B, T)
at::Tensor positions_from_mask(const at::Tensor& attention_mask);
// Index of the last real token of each row (B) for a (B, T) mask.
at::Tensor last_token_index(const at::Tensor& attention_mask);
// Where score() reads, as transformers' Qwen2ForSequenceClassification pools: the rightmost token
// whose id is not pad_token_id (a real token equal to the pad id, e.g. an EOS that is also the pad
// token, is passed over), among those with mask 1 (transformers looks at the ids alone, which is the
// same whenever padding holds the pad id; the mask keeps other padding from being read). Without a
// pad id: the last token with mask 1. input_ids, attention_mask (B, T) -> (B) int64.
at::Tensor score_index(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                       std::optional<int64_t> pad_token_id);

}  // namespace ptk::model
