// rollout_bench: generated tokens/s of the rollout engine on GSM8K-shaped work (prompts = chat-
// rendered GSM8K questions, per-sample output lengths = tokenized GSM8K answers), against (a) a
// loop without KV cache and (b) a static-batch KV-cache loop without refill (HF generate style),
// same model, same run, plus the ideal (every slot always busy). Prints figures; never fails on time.
//
//   build-roll/bench/rollout_bench [--shape small|0.5b|both] [--prompts N] [--samples G] [--slots S]
//                                  [--a-seconds X] [--threads T]
//   build-roll/bench/rollout_bench --decode-attention [--shape small|0.5b] [--slots S] [--rows R] [--context C]
//   build-roll/bench/rollout_bench --sampling [--rows R]
//   build-roll/bench/rollout_bench --lm-head [--shape small|0.5b|both]
//
// Models are random (from a config), so outputs never stop on their own: each sample is capped at
// its answer's length, which is what makes the work realistic. Sampling: temperature 1, full vocab.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "core/checkpoint/hf_config.h"
#include "core/model/kv_cache.h"
#include "core/model/packed_linear.h"
#include "core/model/qwen2.h"
#include "core/runtime/runtime.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "rollout/engine.h"

namespace ptk {
namespace {

using bench::Clock;
using bench::seconds_since;


struct Work {
  std::vector<std::vector<int64_t>> prompts;  // one per prompt
  std::vector<std::vector<int64_t>> lengths;  // [prompt][sample] output tokens
  int64_t useful = 0;                         // sum of lengths
};

rollout::SamplingParams sampling() { return {1.0, 1.0, 0}; }

// (b) HF-generate style: batches of S samples in order (each prompt repeated G times), every row
// prefilled on its own copy of the prompt in one padded call, then every row decoded until the
// longest of the batch is done (finished rows keep computing, as HF pads them).
double static_batches(const model::Qwen2Model& m, const Work& w, int64_t S, int64_t vocab, int64_t* useful,
                      int64_t* row_steps, const model::PackedDecodeWeights* head) {
  std::vector<std::pair<int64_t, int64_t>> all;  // (prompt, length)
  for (size_t p = 0; p < w.prompts.size(); ++p)
    for (auto len : w.lengths[p]) all.emplace_back(static_cast<int64_t>(p), len);
  int64_t max_prompt = 0, max_len = 0;  // a row decodes for its batch's longest output
  for (auto [p, len] : all) {
    max_prompt = std::max<int64_t>(max_prompt, static_cast<int64_t>(w.prompts[p].size()));
    max_len = std::max(max_len, len);
  }
  const int64_t max_ctx = max_prompt + max_len;
  model::KVCache cache(m.config(), S, max_ctx, at::kFloat, at::kCPU);
  at::Tensor logits_buf;
  auto t0 = Clock::now();
  *useful = 0;
  *row_steps = 0;
  for (size_t b = 0; b < all.size(); b += S) {
    const int64_t R = std::min<int64_t>(S, static_cast<int64_t>(all.size() - b));
    int64_t T = 0, steps = 0;
    for (int64_t r = 0; r < R; ++r) {
      T = std::max<int64_t>(T, static_cast<int64_t>(w.prompts[all[b + r].first].size()));
      steps = std::max(steps, all[b + r].second);
      *useful += all[b + r].second;
    }
    *row_steps += R * steps;  // every row samples `steps` tokens, finished or not
    std::vector<int64_t> flat(R * T, 0), slots(R), n_new(R);
    for (int64_t r = 0; r < R; ++r) {
      const auto& pr = w.prompts[all[b + r].first];
      std::copy(pr.begin(), pr.end(), flat.begin() + r * T);
      slots[r] = r;
      n_new[r] = static_cast<int64_t>(pr.size());
      cache.reset(r);
    }
    auto logits = m.forward_cached(torch::tensor(flat, torch::kLong).view({R, T}), slots, n_new, cache,
                                   model::AttentionBackend::kAuto, &logits_buf, head);
    std::vector<rollout::SamplingParams> ps(R, sampling());
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<double> u(R);
      for (int64_t r = 0; r < R; ++r) u[r] = rollout::sample_uniform(7, static_cast<int64_t>(b) + r, s);
      auto d = rollout::sample_rows(logits, ps, u, vocab);
      if (s + 1 == steps) break;
      logits = m.forward_cached(d.ids.view({R, 1}), slots, std::vector<int64_t>(R, 1), cache,
                                model::AttentionBackend::kAuto, &logits_buf, head);  // as the engine does
    }
  }
  return seconds_since(t0);
}

// (a) No KV cache: the first static batch, every step a full forward over prompt + generated
// (left-padded), stopped after `budget_s`; returns tokens/s over the steps it ran.
double no_cache(const model::Qwen2Model& m, const Work& w, int64_t S, int64_t vocab, double budget_s, int64_t* steps_run,
                int64_t* rows) {
  std::vector<std::pair<int64_t, int64_t>> batch;
  for (size_t p = 0; p < w.prompts.size() && static_cast<int64_t>(batch.size()) < S; ++p)
    for (auto len : w.lengths[p])
      if (static_cast<int64_t>(batch.size()) < S) batch.emplace_back(static_cast<int64_t>(p), len);
  const int64_t R = static_cast<int64_t>(batch.size());
  *rows = R;
  std::vector<std::vector<int64_t>> seqs;
  int64_t steps = 0;
  for (auto [p, len] : batch) {
    seqs.push_back(w.prompts[p]);
    steps = std::max(steps, len);
  }
  std::vector<rollout::SamplingParams> ps(R, sampling());
  auto t0 = Clock::now();
  int64_t tokens = 0, s = 0;
  for (; s < steps && seconds_since(t0) < budget_s; ++s) {
    size_t T = 0;
    for (const auto& q : seqs) T = std::max(T, q.size());
    std::vector<int64_t> ids(R * T, 0), mask(R * T, 0);
    for (int64_t r = 0; r < R; ++r) {
      const size_t off = T - seqs[r].size();  // left padding, as HF generate
      for (size_t t = 0; t < seqs[r].size(); ++t) {
        ids[r * T + off + t] = seqs[r][t];
        mask[r * T + off + t] = 1;
      }
    }
    model::ForwardInput in;
    in.input_ids = torch::tensor(ids, torch::kLong).view({R, static_cast<int64_t>(T)});
    in.attention_mask = torch::tensor(mask, torch::kLong).view({R, static_cast<int64_t>(T)});
    model::ForwardOptions fo;
    fo.logits = false;  // only the last position's logits are needed
    auto h = m.forward(in, fo).hidden.select(1, static_cast<int64_t>(T) - 1);  // (R, H)
    std::vector<double> u(R);
    for (int64_t r = 0; r < R; ++r) u[r] = rollout::sample_uniform(7, r, s);
    auto d = rollout::sample_rows(m.logits(h), ps, u, vocab);
    auto ids_cpu = d.ids.contiguous();
    for (int64_t r = 0; r < R; ++r) {
      if (s < batch[r].second) ++tokens;  // useful only while the sample is within its length
      seqs[r].push_back(ids_cpu[r].item<int64_t>());
    }
  }
  *steps_run = s;
  return tokens / seconds_since(t0);
}

// The ideal: a decode step (forward + sampling) over all S slots at the average context, timed
// (median of 10);
// useful tokens/s if every slot were always busy = S / step time.
// With `reuse_logits`, every step writes its logits into one buffer (as the engine does); without,
// each step allocates them afresh (the page-fault cost the buffer removes). `head`: the packed
// weights the engine uses (nullptr = at::mm / at::linear).
double ideal_tps(const model::Qwen2Model& m, int64_t S, int64_t ctx, int64_t vocab, double* step_s,
                 const model::PackedDecodeWeights* head, bool reuse_logits = true) {
  model::KVCache cache(m.config(), S, ctx + 1, at::kFloat, at::kCPU);
  auto prefix = torch::randint(3, 1000, {1, ctx}, torch::kLong);
  m.forward_cached(prefix, {0}, {ctx}, cache);
  std::vector<int64_t> rest, slots(S), ones(S, 1);
  for (int64_t s = 1; s < S; ++s) rest.push_back(s);
  if (!rest.empty()) cache.copy_slot(0, rest);
  std::iota(slots.begin(), slots.end(), 0);
  std::vector<rollout::SamplingParams> ps(S, sampling());
  auto tok = torch::full({S, 1}, 42, torch::kLong);
  // The median of 10 timed steps: on this shared machine a mean of a few steps moved by 50% when
  // another job ran for a second, and the ideal is the one figure of the bench taken in seconds.
  const int reps = 10;
  std::vector<double> times;
  at::Tensor logits_buf;
  for (int i = 0; i <= reps; ++i) {
    auto t0 = Clock::now();
    auto logits = m.forward_cached(tok, slots, ones, cache, model::AttentionBackend::kAuto,
                                   reuse_logits ? &logits_buf : nullptr, head);
    std::vector<double> u(S, 0.5);
    auto d = rollout::sample_rows(logits, ps, u, vocab);
    d.ids.contiguous();
    if (i > 0) times.push_back(seconds_since(t0));  // the first step warms up
    for (int64_t s = 0; s < S; ++s) cache.set_length(s, ctx);
  }
  std::sort(times.begin(), times.end());
  *step_s = 0.5 * (times[reps / 2 - 1] + times[reps / 2]);
  return S / *step_s;
}

Work load_work(const std::string& gsm8k, const tokenizer::Tokenizer& tok, int64_t prompts, int64_t g) {
  std::ifstream in(gsm8k);
  std::vector<std::string> questions, answers;
  for (std::string line; std::getline(in, line);) {
    auto d = json::parse(line, gsm8k);
    questions.emplace_back(d["question"].GetString());
    answers.emplace_back(d["answer"].GetString());
  }
  Work w;
  for (int64_t p = 0; p < prompts; ++p) {
    auto enc = tok.render_chat({{"user", questions.at(p)}}, /*add_generation_prompt=*/true);
    w.prompts.emplace_back(enc.ids.begin(), enc.ids.end());
    std::vector<int64_t> lens;
    // Sample j of prompt p gets the length of answer p * G + j (+1 for the <|im_end|>): lengths
    // within a group vary as real GRPO groups do.
    for (int64_t j = 0; j < g; ++j) lens.push_back(static_cast<int64_t>(tok.encode(answers.at(p * g + j)).size()) + 1);
    w.useful += std::accumulate(lens.begin(), lens.end(), int64_t{0});
    w.lengths.push_back(lens);
  }
  return w;
}

void run_shape(const std::string& shape, const tokenizer::Tokenizer& tok, const std::string& gsm8k, int64_t prompts,
               int64_t g, int64_t S, double a_budget) {
  auto cfg = checkpoint::parse_config(bench::rollout_shape_json(shape), shape + " config");
  auto m = model::Qwen2Model::from_config(cfg, 1);
  const int64_t vocab = static_cast<int64_t>(tok.vocab_size());
  Work w = load_work(gsm8k, tok, prompts, g);
  int64_t prompt_tokens = 0;
  for (const auto& p : w.prompts) prompt_tokens += static_cast<int64_t>(p.size());
  const double mean_prompt = double(prompt_tokens) / prompts, mean_out = double(w.useful) / (prompts * g);
  int64_t max_out = 0;
  for (const auto& l : w.lengths) max_out = std::max(max_out, *std::max_element(l.begin(), l.end()));
  std::fflush(stdout);
  std::printf("\n== shape %s: %lld layers, hidden %lld, vocab %lld | %lld prompts x %lld samples, %lld slots | "
              "prompt %.0f tokens mean, output %.0f mean / %lld max, %lld useful tokens\n",
              shape.c_str(), (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size, (long long)cfg.vocab_size,
              (long long)prompts, (long long)g, (long long)S, mean_prompt, mean_out, (long long)max_out,
              (long long)w.useful);

  // Ours.
  rollout::EngineOptions eo;
  eo.slots = S;
  eo.vocab_limit = vocab;
  rollout::Engine engine(m, eo);
  std::vector<rollout::Request> reqs;
  for (int64_t p = 0; p < prompts; ++p) {
    rollout::Request r;
    r.prompt = w.prompts[p];
    r.samples = g;
    r.seed = p;
    r.sampling = sampling();
    r.sample_max_new_tokens = w.lengths[p];
    reqs.push_back(r);
  }
  engine.generate(reqs);
  const auto st = engine.last_stats();
  const double ours = st.tokens_per_s();
  std::fflush(stdout);
  std::printf("engine           %8.1f tokens/s  (%lld tokens in %.1f s; prefill %.1f s = %.0f%%, decode %.1f s = %.0f%%, "
              "sampling %.1f s = %.0f%%, bookkeeping %.2f s = %.1f%%; occupancy %.0f%%, %lld prefills, %lld prefix copies, "
              "%lld prompt tokens prefilled + %lld padding)\n",
              ours, (long long)st.generated_tokens, st.total_s, st.prefill_s, 100 * st.prefill_s / st.total_s, st.decode_s,
              100 * st.decode_s / st.total_s, st.sample_s, 100 * st.sample_s / st.total_s, st.bookkeeping_s,
              100 * st.bookkeeping_s / st.total_s, 100 * st.occupancy(), (long long)st.prefills,
              (long long)st.prefix_copies, (long long)st.prompt_tokens, (long long)st.prefill_padding);
  std::printf("                 %lld decode steps of %.1f rows mean: decode %.1f ms + sampling %.1f ms per step\n",
              (long long)st.decode_steps, double(st.decode_rows) / std::max<int64_t>(1, st.decode_steps),
              1e3 * st.decode_s / std::max<int64_t>(1, st.decode_steps),
              1e3 * st.sample_s / std::max<int64_t>(1, st.decode_steps));

  // Ideal at the average context of a decode step, with the engine's packed weights (LM head and
  // layers where the CPU allows, as the engine's defaults do for both shapes; the baselines below
  // use them too, so the ratios compare batching policies only).
  const model::PackedDecodeWeights packed =
      m.pack_for_decode(/*lm_head=*/true, /*max_trunk_bytes=*/rollout::EngineOptions{}.pack_max_bytes);
  const model::PackedDecodeWeights* head = &packed;
  const int64_t ctx = static_cast<int64_t>(mean_prompt + mean_out / 2);
  double step_s = 0;
  const double ideal = ideal_tps(m, S, ctx, vocab, &step_s, head);
  std::fflush(stdout);
  std::printf("ideal            %8.1f tokens/s  (decode+sample step over %lld busy slots at context %lld: %.3f s)\n", ideal,
              (long long)S, (long long)ctx, step_s);
  double fresh_step_s = 0;
  ideal_tps(m, S, ctx, vocab, &fresh_step_s, head, /*reuse_logits=*/false);
  std::printf("                 the same step with fresh logits each time (no kept buffer): %.3f s (buffer saves %.0f%%)\n",
              fresh_step_s, 100 * (1 - step_s / fresh_step_s));
  if (packed.lm_head) {
    // The packed weights against at::mm (OpenBLAS repacking the weights each call), at S rows and
    // at 8 rows (a draining tail step), same run.
    double mm_s = 0, few_packed_s = 0, few_mm_s = 0;
    ideal_tps(m, S, ctx, vocab, &mm_s, nullptr);
    const int64_t few = std::min<int64_t>(8, S);
    ideal_tps(m, few, ctx, vocab, &few_packed_s, head);
    ideal_tps(m, few, ctx, vocab, &few_mm_s, nullptr);
    std::printf("                 packed weights (engine: LM head %s, layers %s, %.0f MB, packed in %.3f s) vs at::mm: "
                "step over %lld rows %.3f vs %.3f s (%.2fx), over %lld rows %.3f vs %.3f s (%.2fx)\n",
                st.packed_lm_head ? "yes" : "no", st.packed_trunk ? "yes" : "no", st.packed_bytes / 1e6, st.pack_s,
                (long long)S, step_s, mm_s, mm_s / step_s, (long long)few, few_packed_s, few_mm_s,
                few_mm_s / few_packed_s);
  }

  // (b) static batches with a KV cache, no refill.
  int64_t useful_b = 0, row_steps_b = 0;
  const double tb = static_batches(m, w, S, vocab, &useful_b, &row_steps_b, head);
  const double static_tps = useful_b / tb;
  std::fflush(stdout);
  // At equal cost per row-step, engine / (b) cannot exceed (b)'s row-steps / useful tokens (the
  // engine computes about one row-step per useful token): the workload's bound on the ratio.
  std::printf("(b) static batch %8.1f tokens/s  (%lld useful tokens in %.1f s; %lld row-steps sampled, %.2f per useful "
              "token: the ratio engine / (b) can reach at equal cost per row-step)\n",
              static_tps, (long long)useful_b, tb, (long long)row_steps_b, double(row_steps_b) / useful_b);

  // (a) no KV cache, time-boxed.
  int64_t steps_a = 0, rows_a = 0;
  const double no_cache_tps = no_cache(m, w, S, vocab, a_budget, &steps_a, &rows_a);
  std::fflush(stdout);
  std::printf("(a) no KV cache  %8.1f tokens/s  (first static batch of %lld rows, %lld of %lld steps in the %.0f s box: an "
              "upper bound, later steps are longer)\n",
              no_cache_tps, (long long)rows_a, (long long)steps_a, (long long)max_out, a_budget);
  std::fflush(stdout);
  std::printf("ratios: engine / (b) = %.2fx, engine / (a) <= %.1fx (a is an upper bound), engine / ideal = %.1f%%\n",
              ours / static_tps, ours / no_cache_tps, 100 * ours / ideal);
}

// --lm-head: the decode step's LM head alone, (R, H) x (V, H)^T at the shape's H and V = 151,936,
// then the layers' linears: at::mm (OpenBLAS, which repacks the weight on every call) against
// model::PackedLinear (packed once), best of several per row count, alternated in one process.
void lm_head_bench(const std::string& shape) {
  auto cfg = checkpoint::parse_config(bench::rollout_shape_json(shape), shape + " config");
  const int64_t V = cfg.vocab_size, H = cfg.hidden_size;
  auto W = torch::randn({V, H});
  if (!model::PackedLinear::supported(W)) {
    std::printf("--lm-head: this CPU has no AVX-512F; PackedLinear is unavailable\n");
    return;
  }
  auto tp = Clock::now();
  model::PackedLinear p(W);
  std::printf("\n== LM head, %s shape: (R, %lld) x (%lld, %lld)^T; packing the weight once: %.3f s (%.0f MB)\n",
              shape.c_str(), (long long)H, (long long)V, (long long)H, seconds_since(tp), p.bytes() / 1e6);
  std::printf("%6s %12s %12s %12s %12s %8s\n", "rows", "at::mm ms", "GFLOP/s", "packed ms", "GFLOP/s", "speedup");
  for (int64_t R : {1, 4, 8, 16, 32, 48, 64, 128}) {
    auto x = torch::randn({R, H});
    at::Tensor a = at::empty({R, V}), b;
    double best_mm = 1e30, best_packed = 1e30;
    for (int i = 0; i < 5; ++i) {
      auto t = Clock::now();
      at::mm_out(a, x, W.t());
      best_mm = std::min(best_mm, seconds_since(t));
      t = Clock::now();
      p.forward_out(x, b);
      best_packed = std::min(best_packed, seconds_since(t));
    }
    const double gf = 2.0 * R * V * H / 1e9;
    std::printf("%6lld %12.1f %12.1f %12.1f %12.1f %7.2fx\n", (long long)R, 1e3 * best_mm, gf / best_mm,
                1e3 * best_packed, gf / best_packed, best_mm / best_packed);
    std::fflush(stdout);
  }
  // Every layer's linears (q, k, v, o, gate, up, down) of the shape, one pass over all layers per
  // timing (their weights exceed the caches, as in a real decode step), best of 3.
  const int64_t I = cfg.intermediate_size, Dq = cfg.num_attention_heads * cfg.head_dim,
                Dkv = cfg.num_key_value_heads * cfg.head_dim;
  std::vector<at::Tensor> ws;
  std::vector<model::PackedLinear> ps;
  int64_t bytes = 0;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{Dq, H}, {Dkv, H}, {Dkv, H}, {H, Dq}, {I, H}, {I, H}, {H, I}};
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (auto [n, k] : shapes) {
      ws.push_back(torch::randn({n, k}));
      ps.emplace_back(ws.back());
      bytes += n * k * 4;
    }
  std::printf("the %lld layers' linears (%.2f GB):\n%6s %12s %12s %8s\n", (long long)cfg.num_hidden_layers, bytes / 1e9,
              "rows", "at::mm ms", "packed ms", "speedup");
  for (int64_t R : {1, 8, 16, 64}) {
    std::vector<at::Tensor> xs, outs_mm, outs_packed(ws.size());
    for (const auto& w : ws) {
      xs.push_back(torch::randn({R, w.size(1)}));
      outs_mm.push_back(at::empty({R, w.size(0)}));
    }
    double best_mm = 1e30, best_packed = 1e30;
    for (int i = 0; i < 3; ++i) {
      auto t = Clock::now();
      for (size_t j = 0; j < ws.size(); ++j) at::mm_out(outs_mm[j], xs[j], ws[j].t());
      best_mm = std::min(best_mm, seconds_since(t));
      t = Clock::now();
      for (size_t j = 0; j < ws.size(); ++j) ps[j].forward_out(xs[j], outs_packed[j]);
      best_packed = std::min(best_packed, seconds_since(t));
    }
    std::printf("%6lld %12.1f %12.1f %7.2fx\n", (long long)R, 1e3 * best_mm, 1e3 * best_packed, best_mm / best_packed);
    std::fflush(stdout);
  }
}

// --decode-attention: one decode step's trunk forward (no LM head, no sampling, unpacked linears)
// over R of S slots at context `ctx`, the slots dense (0..R-1), every other one, or spread over the
// whole cache, with each layout of forward_cached's decode attention forced (PTK_DECODE_ATTENTION):
// which measures faster.
void decode_attention_bench(const std::string& shape, int64_t S, int64_t R, int64_t ctx) {
  auto cfg = checkpoint::parse_config(bench::rollout_shape_json(shape), shape + " config");
  auto m = model::Qwen2Model::from_config(cfg, 1);
  model::KVCache cache(m.config(), S, ctx + 1, at::kFloat, at::kCPU);
  m.forward_cached(torch::randint(3, 1000, {1, ctx}, torch::kLong), {0}, {ctx}, cache);
  std::vector<int64_t> rest;
  for (int64_t s = 1; s < S; ++s) rest.push_back(s);
  cache.copy_slot(0, rest);
  std::vector<std::pair<std::string, std::vector<int64_t>>> sets(3);
  sets[0].first = "dense";
  sets[1].first = "every other";
  sets[2].first = "spread";
  for (int64_t r = 0; r < R; ++r) {
    sets[0].second.push_back(r);
    sets[1].second.push_back(std::min(2 * r, S - 1 - (R - 1 - r)));
    sets[2].second.push_back(R > 1 ? r * (S - 1) / (R - 1) : 0);
  }
  std::printf("\n== decode attention, shape %s: %lld of %lld slots at context %lld (trunk forward only, no LM head, "
              "mean of 5 steps)\n",
              shape.c_str(), (long long)R, (long long)S, (long long)ctx);
  auto tok = torch::full({R, 1}, 42, torch::kLong);
  for (const auto& [name, slots] : sets) {
    for (const char* mode : {"rows", "window", "gather"}) {
      setenv("PTK_DECODE_ATTENTION", mode, 1);
      double total = 0;
      for (int i = 0; i <= 5; ++i) {
        auto t0 = Clock::now();
        m.forward_cached_hidden(tok, slots, std::vector<int64_t>(R, 1), cache);  // the trunk: no LM head
        if (i > 0) total += seconds_since(t0);
        for (int64_t s : slots) cache.set_length(s, ctx);
      }
      std::printf("  %-12s slots %lld..%lld  %-6s %8.2f ms/step\n", name.c_str(), (long long)slots.front(),
                  (long long)slots.back(), mode, 1e3 * total / 5);
      std::fflush(stdout);
    }
  }
  unsetenv("PTK_DECODE_ATTENTION");
}

// --sampling: sample_rows (T = 1, no top-k / top-p: the short path) against the general chain it
// replaces for such rows (temperature -> limit -> draw, composed from sampling.h), R rows of the
// real vocabulary, same logits, same run; and a top-p 0.9 batch (candidates, then fallbacks).
void sampling_bench(int64_t R, int64_t vocab) {
  torch::manual_seed(1);
  auto logits = torch::randn({R, 151936}) * 2;
  std::vector<rollout::SamplingParams> ps(R, sampling()), pp(R, {1.0, 0.9, 0});
  std::vector<double> u(R);
  for (int64_t r = 0; r < R; ++r) u[r] = rollout::sample_uniform(3, r, 0);
  auto time_it = [&](const char* name, auto&& f) {
    double total = 0;
    for (int i = 0; i <= 5; ++i) {
      auto t0 = Clock::now();
      f();
      if (i > 0) total += seconds_since(t0);
    }
    std::printf("  %-44s %8.2f ms per batch of %lld rows\n", name, 1e3 * total / 5, (long long)R);
    std::fflush(stdout);
    return total / 5;
  };
  std::printf("\n== sampling, %lld rows x 151936 columns (vocab limit %lld), mean of 5\n", (long long)R, (long long)vocab);
  const double fast = time_it("sample_rows, T 1 (short path)", [&] { rollout::sample_rows(logits, ps, u, vocab); });
  const double chain = time_it("general chain, T 1 (the previous path)", [&] {
    auto x = rollout::apply_temperature(logits, ps);
    auto lse = at::logsumexp(x, 1);
    rollout::limit_vocab_(x, vocab);
    auto ids = rollout::draw(x, ps, u);
    auto lp = x.gather(1, ids.unsqueeze(1)).squeeze(1) - lse;
  });
  std::printf("  short path / chain = %.2fx faster\n", chain / fast);
  // Top-p 0.9 alone (the filter, no draw) on flat rows (random-init-like: nuclei of thousands of
  // tokens) and peaky rows (nuclei of a few): the CPU path (a bucketed pass per row), the tensor path
  // it replaced on CPU (candidates, fallbacks) and the plain full sort; same logits; nuclei compared.
  auto full_sort = [&](const at::Tensor& l) {
    auto sorted = std::get<0>(l.sort(1, true));
    auto probs = at::softmax(sorted, 1);
    auto before = probs.cumsum(1) - probs;
    auto n_keep = (before < 0.9).sum(1, true).clamp_min(1);
    auto thr = sorted.gather(1, n_keep - 1);
    auto x = l.clone();
    x.masked_fill_(x < thr, -INFINITY);
    return x;
  };
  for (const auto& [name, rows] : {std::pair<std::string, at::Tensor>{"flat", logits}, {"peaky", logits * 4}}) {
    at::Tensor a, b, c;
    const double t_cpu = time_it(("top_p 0.9, " + name + " rows: apply_top_p_ (CPU path)").c_str(), [&] {
      a = rows.clone();
      rollout::apply_top_p_(a, pp);
    });
    const double t_tensor = time_it(("top_p 0.9, " + name + " rows: apply_top_p_sorting_").c_str(), [&] {
      b = rows.clone();
      rollout::apply_top_p_sorting_(b, pp);
    });
    const double t_sort = time_it(("top_p 0.9, " + name + " rows: full sort").c_str(), [&] { c = full_sort(rows); });
    const auto ka = at::isfinite(a), kb = at::isfinite(b), kc = at::isfinite(c);
    std::printf("  %s rows: CPU path %.2fx faster than the full sort, %.2fx than apply_top_p_sorting_; nucleus sizes "
                "%.0f mean; rows whose nucleus differs: CPU vs sorting %lld, CPU vs full sort (float32 masses) %lld\n",
                name.c_str(), t_sort / t_cpu, t_tensor / t_cpu, ka.sum(1).to(at::kDouble).mean().item<double>(),
                (long long)(ka != kb).any(1).sum().item<int64_t>(), (long long)(ka != kc).any(1).sum().item<int64_t>());
    std::fflush(stdout);
  }
  time_it("sample_rows, T 1, top_p 0.9, flat rows (whole chain)", [&] { rollout::sample_rows(logits, pp, u, vocab); });
}

std::string arg(int argc, char** argv, const std::string& name, const std::string& def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == "--" + name) return argv[i + 1];
  return def;
}

}  // namespace
}  // namespace ptk

int main(int argc, char** argv) {
  using namespace ptk;
  const std::string src = bench::source_dir();
  const std::string shared = std::getenv("PTK_SHARED_DIR") ? std::getenv("PTK_SHARED_DIR") : src + "/../shared";
  const std::string gsm8k = shared + "/data/math/gsm8k/train.jsonl";
  std::string tj;
  for (const std::string& p : {src + "/assets/tokenizers/qwen/tokenizer.json",
                               shared + "/tokenizers/qwen/tokenizer.json"})
    if (tj.empty() && path_exists(p)) tj = p;
  if (tj.empty() || !path_exists(gsm8k)) {
    std::fflush(stdout);
  std::printf("rollout_bench: skipped: needs %s and the Qwen tokenizer at %s/assets/tokenizers/qwen/tokenizer.json "
                "(scripts/setup.sh)\n", gsm8k.c_str(), src.c_str());
    return 0;
  }
  auto info = runtime::init_and_announce(std::stoi(arg(argc, argv, "threads", "0")));
  (void)info;
  torch::NoGradGuard no_grad;
  tokenizer::LoadOptions lo;
  lo.chat_template = tokenizer::ChatTemplate::kQwen25;  // Qwen2.5's ChatML with its default system prompt
  auto tok = tokenizer::Tokenizer::load(tj, lo);
  const std::string shape = arg(argc, argv, "shape", "both");
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--sampling") {
      sampling_bench(std::stoll(arg(argc, argv, "rows", "64")), static_cast<int64_t>(tok.vocab_size()));
      return 0;
    }
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--lm-head") {
      if (shape == "small" || shape == "both") lm_head_bench("small");
      if (shape == "0.5b" || shape == "both") lm_head_bench("0.5b");
      return 0;
    }
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--decode-attention") {
      const std::string sh = shape == "both" ? "0.5b" : shape;
      decode_attention_bench(sh, std::stoll(arg(argc, argv, "slots", "64")), std::stoll(arg(argc, argv, "rows", "32")),
                             std::stoll(arg(argc, argv, "context", "300")));
      return 0;
    }
  const double a_budget = std::stod(arg(argc, argv, "a-seconds", "30"));
  if (shape == "small" || shape == "both")
    run_shape("small", tok, gsm8k, std::stoll(arg(argc, argv, "prompts", "64")), std::stoll(arg(argc, argv, "samples", "8")),
              std::stoll(arg(argc, argv, "slots", "64")), a_budget);
  if (shape == "0.5b" || shape == "both")
    run_shape("0.5b", tok, gsm8k, std::stoll(arg(argc, argv, "prompts-05b", "4")),
              std::stoll(arg(argc, argv, "samples", "8")), std::stoll(arg(argc, argv, "slots-05b", "16")), a_budget);
  return 0;
}
