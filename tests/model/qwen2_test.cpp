// Qwen2Model against HF transformers' reference dumps (tests/fixtures/hf-qwen2): logits, log-probs,
// hidden states, RoPE, loss, every gradient, score head, sharded/bf16 checkpoints; plus packed
// rows, the KV cache and greedy decoding. Not a speed test.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>

#include "core/kernels/dispatch.h"
#include "core/model/kv_cache.h"
#include "core/model/packed_linear.h"
#include "core/model/qwen2.h"
#include "core/util/error.h"
#include "tests/model/hf_fixture.h"
#include "tests/support/meta_kernels.h"

namespace ptk {
namespace {

using model::ForwardInput;
using model::ForwardOptions;
using model::Qwen2Model;
using test::compare;
using test::fixture_dir;

constexpr double kAtol = 1e-4, kRtol = 1e-4;  // manifest: logits, log-probs, hidden states, scores

class Fixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { at::set_num_threads(1); }
  std::string cfg() const { return GetParam(); }
  Qwen2Model load(const std::string& sub = "checkpoint") const {
    return Qwen2Model::from_pretrained(fixture_dir(cfg()) + "/" + sub);
  }
};

// log_softmax(logits[b, t])[ids[b, t+1]] -> (B, T-1)
at::Tensor next_token_logprobs(const at::Tensor& logits, const at::Tensor& ids) {
  auto lp = torch::log_softmax(logits.narrow(1, 0, logits.size(1) - 1), -1);
  return lp.gather(-1, ids.narrow(1, 1, ids.size(1) - 1).unsqueeze(-1)).squeeze(-1);
}

// Mean cross-entropy of token t+1 predicted at t over labels != -100 (transformers' shift).
at::Tensor masked_mean_loss(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t V = logits.size(-1);
  auto l = logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, V});
  auto y = labels.narrow(1, 1, labels.size(1) - 1).reshape({-1});
  return torch::nn::functional::cross_entropy(
      l, y, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kMean));
}

at::Tensor valid_logprob_mask(const std::string& cfg, const char* which) {
  auto e = test::expected_json(cfg);
  return test::int_matrix(e["next_token_logprobs_valid_mask"][which]);
}

TEST_P(Fixture, RightAndLeftPaddedLogitsAndLogprobs) {
  auto m = load();
  auto ex = test::expected_tensors(cfg());
  for (std::string side : {"right", "left"}) {
    auto b = test::load_batch(cfg(), side + "_padded");
    ForwardInput in{b.ids, {}, b.mask, {}};
    if (side == "left") in.positions = b.positions;  // HF generate's positions, as the fixture
    auto out = m.forward(in);
    PTK_EXPECT_CLOSE(cfg() + " " + side + " logits", compare(out.logits, ex.at(side + ".logits"), b.mask, kAtol, kRtol));
    PTK_EXPECT_CLOSE(cfg() + " " + side + " next-token log-probs",
                     compare(next_token_logprobs(out.logits, b.ids), ex.at(side + ".next_token_logprobs"),
                             valid_logprob_mask(cfg(), (side + "_padded").c_str()), kAtol, kRtol));
  }
}

TEST_P(Fixture, LeftPaddingWithDerivedPositions) {
  // Without positions the model derives cumsum(mask) - 1, which is what the fixture passed.
  auto m = load();
  auto b = test::load_batch(cfg(), "left_padded");
  auto out = m.forward({b.ids, {}, b.mask, {}});
  PTK_EXPECT_CLOSE(cfg() + " left logits, derived positions",
                   compare(out.logits, test::expected_tensors(cfg()).at("left.logits"), b.mask, kAtol, kRtol));
}

TEST_P(Fixture, HiddenStatesPerLayer) {
  auto m = load();
  auto ex = test::expected_tensors(cfg());
  auto b = test::load_batch(cfg(), "right_padded");
  ForwardOptions o;
  o.layer_outputs = true;
  o.logits = false;
  auto out = m.forward({b.ids, {}, b.mask, {}}, o);
  EXPECT_FALSE(out.logits.defined());
  ASSERT_EQ(out.layer_outputs.size(), m.config().num_hidden_layers + 1);
  PTK_EXPECT_CLOSE("embed_out", compare(out.layer_outputs[0], ex.at("right.embed_out"), b.mask, kAtol, kRtol));
  for (int64_t i = 0; i < m.config().num_hidden_layers; ++i)
    PTK_EXPECT_CLOSE("layer_out." + std::to_string(i),
                     compare(out.layer_outputs[i + 1], ex.at("right.layer_out." + std::to_string(i)), b.mask, kAtol, kRtol));
  PTK_EXPECT_CLOSE("final_norm_out", compare(out.hidden, ex.at("right.final_norm_out"), b.mask, kAtol, kRtol));
}

TEST_P(Fixture, RopeTablesAndRotation) {
  auto m = load();
  auto ex = test::expected_tensors(cfg());
  auto e = test::expected_json(cfg());
  std::vector<int64_t> pos;
  for (const auto& p : e["rope"]["positions"].GetArray()) pos.push_back(p.GetInt64());
  auto [cos, sin] = model::rope_cos_sin(m.config(), torch::tensor(pos, torch::kLong));
  PTK_EXPECT_CLOSE("rope cos", compare(cos, ex.at("rope.cos"), {}, 1e-5, 0));
  PTK_EXPECT_CLOSE("rope sin", compare(sin, ex.at("rope.sin"), {}, 1e-5, 0));
  auto right = test::load_batch(cfg(), "right_padded");
  auto left = test::load_batch(cfg(), "left_padded");
  auto T = right.ids.size(1);
  auto [c0, s0] = model::rope_cos_sin(m.config(), torch::arange(T).unsqueeze(0).expand({right.ids.size(0), T}));
  PTK_EXPECT_CLOSE("l0 q rot", compare(model::apply_rope(ex.at("rope.l0_q_pre"), c0, s0), ex.at("rope.l0_q_rot"),
                                       {}, 5e-5, 1e-4));
  PTK_EXPECT_CLOSE("l0 k rot", compare(model::apply_rope(ex.at("rope.l0_k_pre"), c0, s0), ex.at("rope.l0_k_rot"),
                                       {}, 5e-5, 1e-4));
  auto [cl, sl] = model::rope_cos_sin(m.config(), left.positions);
  PTK_EXPECT_CLOSE("left l0 q rot", compare(model::apply_rope(ex.at("rope.left_l0_q_pre"), cl, sl),
                                            ex.at("rope.left_l0_q_rot"), {}, 5e-5, 1e-4));
  // The layer-0 q projection itself (before RoPE): RMSNorm of the embeddings, then q_proj.
  auto emb = ex.at("right.embed_out");
  auto h = emb * torch::rsqrt(emb.pow(2).mean(-1, true) + m.config().rms_norm_eps) * m.layers_[0].input_layernorm;
  auto q = torch::linear(h, m.layers_[0].q_proj_w, m.layers_[0].q_proj_b)
               .view({emb.size(0), T, m.config().num_attention_heads, m.config().head_dim})
               .transpose(1, 2);
  PTK_EXPECT_CLOSE("l0 q before rope", compare(q, ex.at("rope.l0_q_pre"), {}, 5e-5, 1e-4));
}

TEST_P(Fixture, LossAndEveryGradient) {
  auto m = load();
  m.set_requires_grad(true);
  auto ex = test::expected_tensors(cfg());
  auto e = test::expected_json(cfg());
  for (std::string side : {"left", "right"}) {  // right last: its gradients are the reference ones
    for (auto& [n, p] : m.named_parameters())
      if (p.grad().defined()) p.mutable_grad() = at::Tensor();
    auto b = test::load_batch(cfg(), side + "_padded");
    ForwardInput in{b.ids, side == "left" ? b.positions : at::Tensor(), b.mask, {}};
    auto loss = masked_mean_loss(m.forward(in).logits, b.labels);
    double want = e["loss"][(side + "_padded").c_str()].GetDouble();
    EXPECT_NEAR(loss.item<double>(), want, 1e-4) << side;
    std::printf("  %s loss %.7f (HF %.7f, |diff| %.2g)\n", side.c_str(), loss.item<double>(), want,
                std::abs(loss.item<double>() - want));
    if (side == "left") continue;
    loss.backward();
  }
  double worst_norm_rel = 0;
  for (const auto& [name, p] : m.named_parameters()) {
    ASSERT_TRUE(p.grad().defined()) << name;
    PTK_EXPECT_CLOSE("grad." + name, compare(p.grad(), ex.at("grad." + name), {}, 1e-5, 1e-3));
    double want = e["grad_norms"][name.c_str()].GetDouble();
    double rel = std::abs(p.grad().norm().item<double>() - want) / want;
    worst_norm_rel = std::max(worst_norm_rel, rel);
    EXPECT_LE(rel, 1e-4) << "grad norm of " << name;
  }
  std::printf("  grad norms: worst relative diff %.3g\n", worst_norm_rel);
}

TEST_P(Fixture, ScoreHead) {
  auto m = load("seqcls-checkpoint");
  ASSERT_TRUE(m.has_score_head());
  auto ex = test::expected_tensors(cfg());
  for (std::string side : {"right", "left"}) {
    auto b = test::load_batch(cfg(), side + "_padded");
    ForwardOptions o;
    o.logits = false;
    auto out = m.forward({b.ids, side == "left" ? b.positions : at::Tensor(), b.mask, {}}, o);
    auto s = m.score(out.hidden, model::last_token_index(b.mask));
    PTK_EXPECT_CLOSE(side + " scores", compare(s, ex.at("seqcls." + side + ".scores").squeeze(-1), {}, kAtol, kRtol));
  }
}

TEST_P(Fixture, PackedRowEqualsDocumentsOneByOne) {
  // The right batch's sequences packed into one row (plus 3 padding tokens), positions restarting
  // per document: every document's logits equal the reference of that sequence alone.
  auto m = load();
  auto ex = test::expected_tensors(cfg()).at("right.logits");
  auto b = test::load_batch(cfg(), "right_padded");
  auto lengths = b.mask.sum(1);
  std::vector<at::Tensor> parts;
  std::vector<int64_t> docs;
  for (int64_t r = 0; r < b.ids.size(0); ++r) {
    int64_t n = lengths[r].item<int64_t>();
    parts.push_back(b.ids[r].narrow(0, 0, n));
    docs.push_back(n);
  }
  parts.push_back(torch::zeros({3}, torch::kLong));
  auto row = torch::cat(parts).unsqueeze(0);  // (1, sum + 3)
  for (auto backend : {model::AttentionBackend::kExact, model::AttentionBackend::kAuto}) {
    ForwardOptions o;
    o.backend = backend;
    auto out = m.forward({row, {}, {}, {docs}}, o).logits;  // (1, T, V)
    int64_t s = 0;
    for (size_t d = 0; d < docs.size(); ++d) {
      PTK_EXPECT_CLOSE("packed doc " + std::to_string(d),
                       compare(out[0].narrow(0, s, docs[d]), ex[d].narrow(0, 0, docs[d]), {}, kAtol, kRtol));
      s += docs[d];
    }
  }
  // Two rows of different packings in one batch give the same as one row each.
  auto both = m.forward({torch::stack({row[0], row[0]}), {}, {}, {docs, {docs[0] + docs[1], docs[2]}}}).logits;
  auto alone = m.forward({row, {}, {}, {docs}}).logits;
  EXPECT_TRUE(torch::allclose(both[0], alone[0], 1e-5, 1e-5));
}

TEST_P(Fixture, CachedDecodeEqualsUncachedForward) {
  auto m = load();
  auto ex = test::expected_tensors(cfg()).at("right.logits");
  auto b = test::load_batch(cfg(), "right_padded");
  const int64_t prompt = 4;
  // Slot 1 gets row 0's prompt, copied into slots 2 and 3; slots 2..3 decode row 0, slot 0 row 1.
  model::KVCache cache(m.config(), 4, 32, at::kFloat, at::kCPU);
  auto p0 = b.ids[0].narrow(0, 0, prompt).unsqueeze(0);
  auto p1 = b.ids[1].narrow(0, 0, prompt + 1).unsqueeze(0);
  auto l = m.forward_cached(torch::cat({p0, torch::zeros({1, 1}, torch::kLong)}, 1), {1}, {prompt}, cache);
  PTK_EXPECT_CLOSE("prefill last logits", compare(l[0], ex[0][prompt - 1], {}, kAtol, kRtol));
  cache.copy_slot(1, {2, 3});
  EXPECT_EQ(cache.length(3), prompt);
  l = m.forward_cached(p1, {0}, {prompt + 1}, cache);
  PTK_EXPECT_CLOSE("prefill row 1", compare(l[0], ex[1][prompt], {}, kAtol, kRtol));
  double worst = 0;
  for (int64_t t = prompt; t < 10; ++t) {
    // Contiguous slots 2,3 (batched decode path) ...
    auto tok = b.ids[0][t].view({1, 1}).expand({2, 1}).contiguous();
    auto d = m.forward_cached(tok, {2, 3}, {1, 1}, cache);
    auto c = compare(d, ex[0][t].unsqueeze(0).expand({2, ex.size(2)}), {}, kAtol, kRtol);
    EXPECT_EQ(c.violations, 0) << "slots 2,3 at t=" << t << " max " << c.max_abs;
    worst = std::max(worst, c.max_abs);
    // ... and slots 0 and 2 together, out of order (per-slot path), with different lengths.
    if (t + 1 < 10) {
      auto ids = torch::stack({b.ids[1][t + 1].view({1}), b.ids[0][t + 1].view({1})});
      auto e = m.forward_cached(ids, {0, 3}, {1, 1}, cache);
      auto c0 = compare(e[0], ex[1][t + 1], {}, kAtol, kRtol);
      EXPECT_EQ(c0.violations, 0) << "slot 0 at t=" << t + 1 << " max " << c0.max_abs;
      worst = std::max(worst, c0.max_abs);
      // Slot 3 ran ahead of slot 2: roll it back to stay in step.
      cache.set_length(3, cache.length(3) - 1);
    }
  }
  std::printf("  cached decode: max |diff| vs reference logits %.3g\n", worst);
  EXPECT_EQ(cache.length(2), 10);
  EXPECT_THROW(m.forward_cached(torch::zeros({1, 40}, torch::kLong), {1}, {40}, cache), Error);
}

// Decode over any set of slots (dense, with idle slots inside the range, sparse, out of order,
// a single slot) gives each row the logits of an uncached forward over that slot's own sequence,
// also when the logits go into a caller's buffer (kept, not reallocated, as the row count varies)
// through the packed LM head.
TEST_P(Fixture, DecodeOverAnySetOfSlotsEqualsUncachedForward) {
  auto m = load();
  // Every decode attention layout: the default (per-row kernel on AVX-512 CPUs, else window or
  // gather by the slot set), then each batched layout forced.
  for (const char* mode : {"", "window", "gather"}) {
    kernels::Options opts = kernels::options();
    if (*mode) opts.decode_attention = std::string(mode) == "window" ? kernels::DecodeAttention::kWindow
                                                                     : kernels::DecodeAttention::kGather;
    kernels::ScopedOptions scoped(opts);
    SCOPED_TRACE(std::string("kernels.decode_attention=") + (*mode ? mode : "auto"));
    const int64_t S = 8, V = m.config().vocab_size;
    torch::manual_seed(3);
    model::KVCache cache(m.config(), S, 48, at::kFloat, at::kCPU);
    std::vector<std::vector<int64_t>> seqs(S);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = 2 + (s * 5) % 7;  // prompts of 2..8 tokens: every slot at its own length
      auto p = torch::randint(0, V, {1, n}, torch::kLong);
      seqs[s] = std::vector<int64_t>(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + n);
      m.forward_cached(p, {s}, {n}, cache);
    }
    // Window with idle slots inside (1,4,6 / 0,2,4,6 / 6,1,4 unsorted), sparse beyond twice the rows
    // (0,7 / 7,1), contiguous (2,3 / all), a single slot.
    const std::vector<std::vector<int64_t>> steps = {{0, 1, 2, 3, 4, 5, 6, 7}, {1, 4, 6}, {0, 7}, {2, 3}, {6, 1, 4},
                                                     {0, 2, 4, 6}, {7, 1}, {5}, {3, 0, 7, 2}};
    double worst = 0;
    // Even steps (the first has the most rows) write their logits into one buffer, as the engine does.
    at::Tensor buffer;
    const void* buffer_storage = nullptr;
    // ... through the packed layers and LM head where this CPU allows (the engine's path).
    const auto packed = m.pack_for_decode(/*lm_head=*/true, /*max_trunk_bytes=*/int64_t{1} << 40);
    for (size_t k = 0; k < steps.size(); ++k) {
      const auto& set = steps[k];
      const int64_t R = static_cast<int64_t>(set.size());
      auto tok = torch::randint(0, V, {R, 1}, torch::kLong);
      const std::vector<int64_t> ones(R, 1);
      auto got = k % 2 == 0 ? m.forward_cached(tok, set, ones, cache, model::AttentionBackend::kAuto,
                                               &buffer, &packed)
                       : m.forward_cached(tok, set, ones, cache);  // (R, V)
      ASSERT_EQ(got.sizes(), (std::vector<int64_t>{R, V}));
      if (k % 2 == 0) {
        EXPECT_EQ(got.data_ptr(), buffer.data_ptr()) << "the logits were not written into the buffer";
        if (!buffer_storage) buffer_storage = buffer.storage().data();
        EXPECT_EQ(buffer.storage().data(), buffer_storage)
            << "step " << k << " (" << R << " rows) reallocated the buffer";
      }
      for (int64_t r = 0; r < R; ++r) {
        auto& q = seqs[set[r]];
        q.push_back(tok[r][0].item<int64_t>());
        EXPECT_EQ(cache.length(set[r]), static_cast<int64_t>(q.size()));  // every token is in the cache
        auto full = m.forward({torch::tensor(q, torch::kLong).unsqueeze(0), {}, {}, {}}).logits[0];
        auto c = compare(got[r], full[full.size(0) - 1], {}, kAtol, kRtol);
        EXPECT_EQ(c.violations, 0) << "slot " << set[r] << " in a step of " << R << " rows: max " << c.max_abs;
        worst = std::max(worst, c.max_abs);
      }
    }
    std::printf("  decode over slot sets (%s): max |diff| vs uncached forward %.3g\n", *mode ? mode : "default", worst);
  }
}

TEST_P(Fixture, GreedyGenerationMatchesTransformers) {
  auto m = load();
  auto e = test::expected_json(cfg());
  int64_t eos = 2;
  for (const auto& g : e["generation"].GetArray()) {
    std::vector<int64_t> prompt, want;
    for (const auto& x : g["prompt_ids"].GetArray()) prompt.push_back(x.GetInt64());
    for (const auto& x : g["new_ids"].GetArray()) want.push_back(x.GetInt64());
    model::KVCache cache(m.config(), 1, 64, at::kFloat, at::kCPU);
    auto logits = m.forward_cached(torch::tensor(prompt, torch::kLong).unsqueeze(0), {0},
                                   {static_cast<int64_t>(prompt.size())}, cache);
    std::vector<int64_t> got;
    while (got.size() < want.size()) {
      int64_t next = logits.argmax(-1).item<int64_t>();
      got.push_back(next);
      if (next == eos) break;
      logits = m.forward_cached(torch::tensor({next}, torch::kLong).view({1, 1}), {0}, {1}, cache);
    }
    EXPECT_EQ(got, want);
  }
}

INSTANTIATE_TEST_SUITE_P(HF, Fixture, ::testing::Values("tiny-tied", "tiny-untied"));

TEST(Qwen2Variants, ShardedCheckpointGivesTheSameModel) {
  at::set_num_threads(1);
  auto single = Qwen2Model::from_pretrained(fixture_dir("tiny-untied") + "/checkpoint");
  auto sharded = Qwen2Model::from_pretrained(fixture_dir("tiny-untied") + "/checkpoint-sharded");
  auto a = single.named_parameters(), b = sharded.named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  }
  auto batch = test::load_batch("tiny-untied", "right_padded");
  PTK_EXPECT_CLOSE("sharded right logits",
                   compare(sharded.forward({batch.ids, {}, batch.mask, {}}).logits,
                           test::expected_tensors("tiny-untied").at("right.logits"), batch.mask, kAtol, kRtol));
}

TEST(Qwen2Variants, Bf16CheckpointUpcastsExactlyOrStaysBf16) {
  at::set_num_threads(1);
  const auto dir = fixture_dir("tiny-tied") + "/checkpoint-bf16";
  auto m = Qwen2Model::from_pretrained(dir);
  auto raw = checkpoint::read_checkpoint_tensors(dir);
  for (const auto& [name, p] : m.named_parameters()) {
    EXPECT_EQ(p.scalar_type(), at::kFloat) << name;
    EXPECT_EQ(raw.at(name).scalar_type(), at::kBFloat16) << name;
    EXPECT_TRUE(torch::equal(p, raw.at(name).to(at::kFloat))) << name;  // bf16 -> fp32 is exact
  }
  auto batch = test::load_batch("tiny-tied", "right_padded");
  auto ex = test::expected_tensors("tiny-tied").at("bf16ckpt.right.logits");
  PTK_EXPECT_CLOSE("bf16 checkpoint logits (fp32 compute)",
                   compare(m.forward({batch.ids, {}, batch.mask, {}}).logits, ex, batch.mask, kAtol, kRtol));
  model::LoadOptions keep;
  keep.dtype = at::kBFloat16;
  auto mb = Qwen2Model::from_pretrained(dir, keep);
  EXPECT_EQ(mb.embed_tokens_.scalar_type(), at::kBFloat16);
  auto lb = mb.forward({batch.ids, {}, batch.mask, {}}).logits;
  EXPECT_EQ(lb.scalar_type(), at::kBFloat16);
  // bf16 arithmetic: loose, but the same model (logits span about +-10).
  auto d = compare(lb.to(at::kFloat), ex, batch.mask, 0.5, 0.05);
  std::printf("  bf16 compute vs fp32 reference: max |diff| %.3g\n", d.max_abs);
  EXPECT_EQ(d.violations, 0);
}

TEST(Qwen2Config, RandomInitFromConfigAlone) {
  at::set_num_threads(1);
  auto c = checkpoint::read_config(fixture_dir("tiny-untied") + "/checkpoint");
  auto a = Qwen2Model::from_config(c, 7), b = Qwen2Model::from_config(c, 7);
  auto ref = Qwen2Model::from_pretrained(fixture_dir("tiny-untied") + "/checkpoint").named_parameters();
  auto pa = a.named_parameters(), pb = b.named_parameters();
  ASSERT_EQ(pa.size(), ref.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, ref[i].first);
    EXPECT_EQ(pa[i].second.sizes(), ref[i].second.sizes()) << pa[i].first;
    EXPECT_TRUE(torch::equal(pa[i].second, pb[i].second)) << "seeded init differs: " << pa[i].first;
  }
  auto out = a.forward({torch::randint(0, c.vocab_size, {2, 5}, torch::kLong), {}, {}, {}});
  EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 5, c.vocab_size}));
  EXPECT_TRUE(torch::isfinite(out.logits).all().item<bool>());
  // A Qwen2.5-72B shape from its config alone (no weights allocated): the parameter count.
  auto big = checkpoint::parse_config(R"({"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2",
      "hidden_size":8192,"intermediate_size":29568,"num_hidden_layers":80,"num_attention_heads":64,
      "num_key_value_heads":8,"vocab_size":152064,"rope_theta":1000000.0,"rms_norm_eps":1e-6,
      "tie_word_embeddings":false,"max_position_embeddings":32768})", "72b");
  EXPECT_EQ(big.head_dim, 128);
}

TEST(Qwen2Config, AddScoreHeadMakesASequenceClassifierThatSavesAndLoads) {
  at::set_num_threads(1);
  auto m = Qwen2Model::from_pretrained(fixture_dir("tiny-untied") + "/checkpoint");
  m.add_score_head(11, 0);
  EXPECT_TRUE(m.has_score_head());
  EXPECT_EQ(m.config().architecture, "Qwen2ForSequenceClassification");
  EXPECT_EQ(m.config().pad_token_id.value_or(-1), 0);
  EXPECT_EQ(m.score_.sizes(), (std::vector<int64_t>{1, m.config().hidden_size}));
  EXPECT_FALSE(m.lm_head_.defined());
  // transformers' init: normal(0, initializer_range); 1 x H draws, so only a loose check of the std.
  double sd = m.score_.std().item<double>();
  EXPECT_GT(sd, 0.3 * m.config().initializer_range);
  EXPECT_LT(sd, 3.0 * m.config().initializer_range);
  auto names = m.named_parameters();
  EXPECT_EQ(names.back().first, "score.weight");
  EXPECT_THROW(m.add_score_head(11, 0), Error);
  // Saved and loaded back: same scores.
  char tmpl[] = "/tmp/ptk_score_head_XXXXXX";
  std::string dir = mkdtemp(tmpl);
  m.save_pretrained(dir + "/rm");
  auto back = Qwen2Model::from_pretrained(dir + "/rm");
  ASSERT_TRUE(back.has_score_head());
  auto ids = torch::randint(1, m.config().vocab_size, {2, 6}, torch::kLong);
  auto idx = torch::tensor({5, 3}, torch::kLong);
  auto a = m.score(m.forward({ids, {}, {}, {}}, {false}).hidden, idx);
  auto b = back.score(back.forward({ids, {}, {}, {}}, {false}).hidden, idx);
  EXPECT_TRUE(torch::allclose(a, b, 0, 0)) << a << b;
  std::system(("rm -rf " + dir).c_str());
}

TEST(Qwen2Rope, YarnScaling) {
  checkpoint::Qwen2Config c;
  c.head_dim = 128;
  c.rope_theta = 1e6;
  c.max_position_embeddings = 131072;
  auto plain = model::rope_inv_freq(c).first;
  c.rope_scaling = checkpoint::RopeScaling{"yarn", 1.0, 32768, std::nullopt, 32, 1};
  auto [same, s1] = model::rope_inv_freq(c);
  EXPECT_TRUE(torch::allclose(same, plain));  // factor 1 is plain RoPE
  EXPECT_EQ(s1, 1.0);
  c.rope_scaling->factor = 4.0;
  auto [yarn, s4] = model::rope_inv_freq(c);
  EXPECT_NEAR(s4, 0.1 * std::log(4.0) + 1.0, 1e-12);  // the attention factor
  // High frequencies (first dims) are kept, low ones (last dims) divided by the factor.
  EXPECT_FLOAT_EQ(yarn[0].item<float>(), plain[0].item<float>());
  EXPECT_NEAR(yarn[63].item<float>(), plain[63].item<float>() / 4, 1e-12);
  EXPECT_TRUE((yarn <= plain).all().item<bool>());
  auto [cos, sin] = model::rope_cos_sin(c, torch::tensor({0}, torch::kLong));
  EXPECT_NEAR(cos[0][0].item<double>(), s4, 1e-6);  // cos(0) * attention factor
}

TEST(Qwen2Inputs, BadInputsAreRefused) {
  at::set_num_threads(1);
  auto m = Qwen2Model::from_pretrained(fixture_dir("tiny-tied") + "/checkpoint");
  auto ids = torch::full({1, 4}, 5, torch::kLong);
  EXPECT_THROW(m.forward({ids, {}, torch::tensor({1, 0, 1, 1}).view({1, 4}), {}}), Error);  // holes
  EXPECT_THROW(m.forward({torch::full({1, 4}, 100000, torch::kLong), {}, {}, {}}), Error);   // out of vocab
  EXPECT_THROW(m.forward({ids, {}, {}, {{3, 3}}}), Error);                                    // docs > T
  EXPECT_THROW(m.forward({ids, {}, torch::ones({1, 4}), {{4}}}), Error);                      // both
  EXPECT_THROW(m.score(torch::zeros({1, 4, 64}), torch::zeros({1}, torch::kLong)), Error);    // no score head
}

TEST(Qwen2Inputs, HostRowSpansPlanAsTheMaskDoesAndNeverReadIt) {
  // row_spans describe the mask host-side: the same logits as reading the mask, and a forward on
  // the meta device (where a mask cannot be read back) plans from them alone.
  at::set_num_threads(1);
  auto m = Qwen2Model::from_pretrained(fixture_dir("tiny-tied") + "/checkpoint");
  auto ids = torch::tensor({5, 6, 7, 0, 0, 8, 9, 10, 0, 0, 0, 0}, torch::kLong).view({3, 4});
  auto mask = torch::tensor({1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0}, torch::kLong).view({3, 4});
  ForwardInput in{ids, {}, mask, {}};
  auto want = m.forward(in).logits;
  in.row_spans = {{0, 3}, {1, 3}, {0, 0}};
  auto got = m.forward(in).logits;
  for (int64_t b = 0; b < 2; ++b)  // real rows; the all-padding row's logits are not meaningful
    EXPECT_TRUE(torch::equal(got[b], want[b])) << "row " << b;
  in.row_spans = {{0, 3}, {1, 4}, {0, 0}};
  EXPECT_THROW(m.forward(in), Error);  // does not fit the row
  in.row_spans = {{0, 3}};
  EXPECT_THROW(m.forward(in), Error);  // one span per row
  test::register_meta_kernels();
  auto meta = m;
  meta.to(torch::kMeta, torch::kFloat);
  ForwardInput mi{ids.to(torch::kMeta), {}, mask.to(torch::kMeta), {}, {{0, 3}, {1, 3}, {0, 0}}};
  auto out = meta.forward(mi).logits;
  EXPECT_TRUE(out.is_meta());
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{3, 4, m.config().vocab_size}));
}

TEST(Qwen2Inputs, ScoreIndexIsTheLastNonPadToken) {
  // transformers' Qwen2ForSequenceClassification reads the rightmost token whose id is not the pad
  // id: a real token equal to it (an EOS that is also the pad token) is passed over, where the
  // last-mask-one index would read it. Right and left padding; no pad id: the last mask-one token.
  auto ids = torch::tensor({7, 8, 0, 0, 0, 0, 7, 8, 5, 7, 0, 0}, torch::kLong).view({3, 4});
  auto mask = torch::tensor({1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0}, torch::kLong).view({3, 4});
  EXPECT_TRUE(model::score_index(ids, mask, 0).equal(torch::tensor({1, 3, 1}, torch::kLong)));
  EXPECT_TRUE(model::score_index(ids, mask, std::nullopt).equal(torch::tensor({1, 3, 2}, torch::kLong)));
  EXPECT_TRUE(model::last_token_index(mask).equal(torch::tensor({1, 3, 2}, torch::kLong)));
  // Device-generic: on the meta device (no data) it stays there, one index per row, nothing read back.
  auto meta = model::score_index(ids.to(torch::kMeta), mask.to(torch::kMeta), 0);
  EXPECT_TRUE(meta.is_meta());
  EXPECT_EQ(meta.sizes(), (std::vector<int64_t>{3}));
  EXPECT_EQ(meta.scalar_type(), torch::kLong);
}

}  // namespace
}  // namespace ptk
