// Packed rows' attention (core/model/qwen2.cpp, PackedPlan): short documents are gathered into
// padded batches and take one causal attention per batch; long or lone documents are attended one
// by one. Checked on a small random Qwen2 against (a) every document run alone and (b) the
// per-document loop (kernels.packed_attention = per_document): logits at every position (gaps and
// padding included), every parameter's gradient, and the checkpointed backward. Which path ran is
// read from the layer's profiler scopes, so a plan that silently falls back fails the test.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/record_function.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "core/kernels/dispatch.h"
#include "core/model/qwen2.h"

namespace ptk::model {
namespace {

checkpoint::Qwen2Config small_config() {
  checkpoint::Qwen2Config c;
  c.vocab_size = 97;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 4096;
  c.rope_theta = 1e4;
  c.tie_word_embeddings = false;
  return c;
}

// Counts the attention scopes decoder_layer opens (RECORD_FUNCTION names) while alive.
std::atomic<int> g_padded{0}, g_alone{0};
std::unique_ptr<at::ObserverContext> count_scope(const at::RecordFunction& fn) {
  const std::string name = fn.name();
  if (name == "ptk::attention_padded_batch") ++g_padded;
  if (name == "ptk::attention_alone_document") ++g_alone;
  return nullptr;
}
struct ScopeCounter {
  at::CallbackHandle handle;
  ScopeCounter() {
    g_padded = 0;
    g_alone = 0;
    handle = at::addThreadLocalCallback(at::RecordFunctionCallback(count_scope).scopes({at::RecordScope::FUNCTION}));
  }
  ~ScopeCounter() { at::removeCallback(handle); }
};

// kernels.packed_attention = per_document (the per-document loop) while alive.
struct PerDocumentLoop {
  static kernels::Options per_document() {
    kernels::Options o = kernels::options();
    o.packed_attention = kernels::PackedAttention::kPerDocument;
    return o;
  }
  kernels::ScopedOptions scoped{per_document()};
};

struct Result {
  at::Tensor logits;  // (B, T, V)
  std::map<std::string, at::Tensor> grads;
  int padded = 0, alone = 0;  // attention scopes opened in forward
};

// Forward + backward of sum(log_softmax(logits) * w).
Result run(Qwen2Model& m, const ForwardInput& in, const at::Tensor& w, bool checkpointed = false) {
  for (auto& [n, p] : m.named_parameters()) p.mutable_grad() = at::Tensor();
  ForwardOptions o;
  o.activation_checkpointing = checkpointed;
  Result r;
  {
    ScopeCounter count;
    r.logits = m.forward(in, o).logits;
    r.padded = g_padded, r.alone = g_alone;
  }
  (at::log_softmax(r.logits, -1) * w).sum().backward();
  r.logits = r.logits.detach();
  for (auto& [n, p] : m.named_parameters()) r.grads[n] = p.grad().defined() ? p.grad().clone() : at::Tensor();
  return r;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

void expect_same_grads(const std::string& what, const std::map<std::string, at::Tensor>& a,
                       const std::map<std::string, at::Tensor>& b) {
  double worst = 0;
  for (const auto& [name, g] : a) {
    ASSERT_TRUE(g.defined()) << what << ": " << name << " has no gradient";
    ASSERT_TRUE(b.at(name).defined()) << what << ": " << name << " has no gradient (reference)";
    const double d = max_diff(g, b.at(name)), scale = b.at(name).abs().max().item<double>();
    worst = std::max(worst, d / std::max(scale, 1e-30));
    EXPECT_LE(d, 1e-6 + 1e-5 * scale) << what << " " << name;
  }
  std::printf("  %s: %zu gradients, max relative diff %.3g\n", what.c_str(), a.size(), worst);
}

// Each document of `docs` run alone (one row, positions from 0) with weights w at its positions:
// logits written into a (B, T, V) tensor (zero elsewhere), gradients of the summed losses.
Result documents_alone(Qwen2Model& m, const at::Tensor& ids, const std::vector<std::vector<int64_t>>& docs,
                    const at::Tensor& w) {
  for (auto& [n, p] : m.named_parameters()) p.mutable_grad() = at::Tensor();
  Result r;
  r.logits = at::zeros({ids.size(0), ids.size(1), m.config().vocab_size});
  for (size_t b = 0; b < docs.size(); ++b) {
    int64_t s = 0;
    for (int64_t len : docs[b]) {
      auto logits = m.forward({ids[b].narrow(0, s, len).unsqueeze(0), {}, {}, {}}).logits[0];  // (len, V)
      (at::log_softmax(logits, -1) * w[b].narrow(0, s, len)).sum().backward();
      r.logits[b].narrow(0, s, len).copy_(logits.detach());
      s += len;
    }
  }
  for (auto& [n, p] : m.named_parameters()) r.grads[n] = p.grad().defined() ? p.grad().clone() : at::Tensor();
  return r;
}

// 1 where a position belongs to a document, 0 in gaps / padding: (B, T, 1).
at::Tensor in_documents(const std::vector<std::vector<int64_t>>& docs, int64_t T) {
  auto keep = at::zeros({static_cast<int64_t>(docs.size()), T, 1});
  for (size_t b = 0; b < docs.size(); ++b) {
    int64_t s = 0;
    for (int64_t len : docs[b]) s += len;
    keep[b].narrow(0, 0, s).fill_(1);
  }
  return keep;
}

void check_packing(const std::string& what, const std::vector<std::vector<int64_t>>& docs, int64_t T,
                   int expect_padded, int expect_alone) {
  at::set_num_threads(1);
  torch::manual_seed(5);
  auto m = Qwen2Model::from_config(small_config(), 13);
  m.set_requires_grad(true);
  const int64_t B = static_cast<int64_t>(docs.size()), V = m.config().vocab_size;
  auto ids = torch::randint(0, V, {B, T}, torch::kLong);
  auto w = torch::randn({B, T, V});
  ForwardInput in{ids, {}, {}, docs};

  auto packed = run(m, in, w);
  const int layers = static_cast<int>(m.config().num_hidden_layers);
  EXPECT_EQ(packed.padded, expect_padded * layers) << what << ": padded batches run";
  EXPECT_EQ(packed.alone, expect_alone * layers) << what << ": documents attended alone next to the batches";
  Result loop;
  {
    PerDocumentLoop force;
    loop = run(m, in, w);
  }
  EXPECT_EQ(loop.padded + loop.alone, 0) << what << ": per_document still batched";

  // Every position, gaps and padding included, as the per-document loop gives it.
  const double d_loop = max_diff(packed.logits, loop.logits);
  EXPECT_LE(d_loop, 1e-5) << what;
  expect_same_grads(what + " vs per-document loop", packed.grads, loop.grads);

  // Each document equals that document run alone (logits and, with the gaps' weights zeroed, the
  // gradient of every parameter).
  auto keep = in_documents(docs, T);
  auto w_docs = w * keep;
  auto alone = documents_alone(m, ids, docs, w_docs);
  const double d_alone = max_diff(packed.logits * keep, alone.logits);
  EXPECT_LE(d_alone, 1e-5) << what;
  auto packed_docs = run(m, in, w_docs);
  expect_same_grads(what + " vs documents alone", packed_docs.grads, alone.grads);

  // The checkpointed backward rebuilds the same plan.
  auto ckpt = run(m, in, w, /*checkpointed=*/true);
  expect_same_grads(what + " checkpointed vs plain", ckpt.grads, packed.grads);
  std::printf("  %s: max |logit diff| vs loop %.3g, vs documents alone %.3g\n", what.c_str(), d_loop, d_alone);
}

TEST(PackedAttention, ShortDocumentsBatchedLongOneAloneGapsAndEmptyRow) {
  // Lengths sorted: 5 7 9 10 11 12 13 | 20 22 | 60. The first seven pad to 13 (7 x 13^2 <= 2 x sum
  // L^2), 20 would break that: a second batch {20, 22}; 60 would break that one: attended alone.
  // Row 0: four documents + 26 padding; row 1: the long document + 4; row 2: three documents and a
  // gap of 35; row 3: no document at all; row 4: two documents + 22.
  check_packing("mixed", {{9, 12, 7, 10}, {60}, {5, 11, 13}, {}, {20, 22}}, 64, /*padded=*/2, /*alone=*/1);
}

TEST(PackedAttention, OneBatchWhenEveryDocumentIsShort) {
  check_packing("all short", {{17, 15, 16}, {14, 18, 12, 3}}, 51, /*padded=*/1, /*alone=*/0);
}

TEST(PackedAttention, DocumentsPastTheLengthCapKeepThePerDocumentLoop) {
  // 520 and 530 exceed the 512-token cap and leave 10 alone: no batch, the per-document loop.
  check_packing("long", {{520, 10}, {530}}, 540, /*padded=*/0, /*alone=*/0);
}

TEST(PackedAttention, LeftPaddedRowsEqualPerDocumentLoop) {
  // Left padding: one segment per row not starting at 0, positions from the mask. Batched.
  at::set_num_threads(1);
  torch::manual_seed(9);
  auto m = Qwen2Model::from_config(small_config(), 17);
  m.set_requires_grad(true);
  auto ids = torch::randint(0, 97, {3, 20}, torch::kLong);
  auto mask = torch::ones({3, 20}, torch::kLong);
  mask[0].narrow(0, 0, 6).zero_();
  mask[2].narrow(0, 0, 11).zero_();
  auto w = torch::randn({3, 20, 97}) * mask.unsqueeze(-1).to(at::kFloat);
  ForwardInput in{ids, {}, mask, {}};
  auto packed = run(m, in, w);
  EXPECT_EQ(packed.padded, 2);  // one batch per layer
  Result loop;
  {
    PerDocumentLoop force;
    loop = run(m, in, w);
  }
  EXPECT_LE(max_diff(packed.logits, loop.logits), 1e-5);
  expect_same_grads("left-padded vs per-document loop", packed.grads, loop.grads);
}

}  // namespace
}  // namespace ptk::model
