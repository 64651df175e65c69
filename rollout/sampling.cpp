// The sampler chain (temperature -> vocabulary limit -> top-k -> top-p -> draw) on (R, V) logits.
// Not the engine's scheduling: see engine.cpp.
#include "rollout/sampling.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/util/error.h"

namespace ptk::rollout {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Candidates the tensor top-p sorts first (apply_top_p_sorting_); a row whose nucleus is wider falls back to more.
constexpr int64_t kTopPCandidates = 256;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

bool any_top_k(const std::vector<SamplingParams>& p) {
  for (const auto& s : p)
    if (!s.greedy() && s.top_k > 0) return true;
  return false;
}

bool any_top_p(const std::vector<SamplingParams>& p) {
  for (const auto& s : p)
    if (!s.greedy() && s.top_p < 1.0) return true;
  return false;
}

}  // namespace

void validate(const SamplingParams& p, const std::string& where) {
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature))
    throw Error(where + ": temperature " + std::to_string(p.temperature) + " must be >= 0 (0 = greedy)");
  if (!(p.top_p > 0.0 && p.top_p <= 1.0))
    throw Error(where + ": top_p " + std::to_string(p.top_p) + " must be in (0, 1] (1 = off)");
  if (p.top_k < 0) throw Error(where + ": top_k " + std::to_string(p.top_k) + " must be >= 0 (0 = off)");
}

double sample_uniform(uint64_t seed, int64_t sample, int64_t step) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(sample));
  h = splitmix64(h ^ (static_cast<uint64_t>(step) * 0xD1B54A32D192ED03ull));
  // 53 random bits, centred in their bucket: strictly inside (0, 1).
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

at::Tensor apply_temperature(const at::Tensor& logits, const std::vector<SamplingParams>& params) {
  const int64_t R = logits.size(0);
  std::vector<float> inv(R);
  bool all_one = true;
  for (int64_t r = 0; r < R; ++r) {
    inv[r] = params[r].greedy() ? 1.0f : static_cast<float>(1.0 / params[r].temperature);
    all_one = all_one && inv[r] == 1.0f;
  }
  auto x = logits.to(at::kFloat);
  if (all_one) return x.is_same(logits) ? x.clone() : x;
  return x * at::tensor(inv, at::kFloat).to(x.device()).unsqueeze(1);  // (R, V)
}

void limit_vocab_(at::Tensor& x, int64_t vocab_limit) {
  const int64_t V = x.size(1);
  if (vocab_limit > 0 && vocab_limit < V) x.narrow(1, vocab_limit, V - vocab_limit).fill_(kNegInf);
}

void apply_top_k_(at::Tensor& x, const std::vector<SamplingParams>& params) {
  if (!any_top_k(params)) return;
  const int64_t R = x.size(0), V = x.size(1);
  int64_t kmax = 1;
  for (const auto& p : params)
    if (!p.greedy() && p.top_k > 0) kmax = std::max(kmax, std::min(p.top_k, V));
  auto top = std::get<0>(at::topk(x, kmax, 1, /*largest=*/true, /*sorted=*/true));  // (R, kmax)
  std::vector<int64_t> kth(R, 0);
  std::vector<uint8_t> on(R, 0);
  for (int64_t r = 0; r < R; ++r) {
    const auto& p = params[r];
    if (!p.greedy() && p.top_k > 0 && p.top_k < V) {
      kth[r] = p.top_k - 1;
      on[r] = 1;
    }
  }
  auto dev = x.device();
  auto thr = top.gather(1, at::tensor(kth, at::kLong).to(dev).unsqueeze(1));  // (R, 1)
  auto use = at::tensor(on, at::kByte).to(dev, at::kBool).unsqueeze(1);                  // (R, 1)
  thr = at::where(use, thr, at::full_like(thr, kNegInf));
  x.masked_fill_(x < thr, kNegInf);
}

void apply_top_p_sorting_(at::Tensor& x, const std::vector<SamplingParams>& params) {
  if (!any_top_p(params)) return;
  // The nucleus of a row: sort descending, keep a token while the mass strictly before it is below
  // top_p (the first token always), then keep every column >= the last kept value (ties kept).
  // Sorting all V columns is the cost, so only the top C candidates are sorted (at::topk): their
  // prefix masses are the same numbers the full sort gives, and when the C candidates' mass
  // reaches top_p, every later token has mass before it >= top_p, so the nucleus lies within them
  // and its threshold is exact. Rows whose candidates fall short try more (see below), at last the
  // full sort.
  const int64_t R = x.size(0), V = x.size(1);
  auto dev = x.device();
  std::vector<int64_t> todo;
  for (int64_t r = 0; r < R; ++r)
    if (!params[r].greedy() && params[r].top_p < 1.0) todo.push_back(r);
  auto thr_all = at::full({R, 1}, kNegInf, x.options());
  // Each row's candidate count depends only on the row itself (its draw must not depend on the
  // batch); rows at the same count are done together.
  std::vector<int64_t> cands(R, std::min<int64_t>(kTopPCandidates, V));
  while (!todo.empty()) {
    int64_t C = V;
    for (int64_t r : todo) C = std::min(C, cands[r]);
    std::vector<int64_t> now, later;
    for (int64_t r : todo) (cands[r] == C ? now : later).push_back(r);
    auto idx = at::tensor(now, at::kLong).to(dev);
    auto rows = x.index_select(0, idx);                                            // (n, V)
    auto top = C < V ? std::get<0>(at::topk(rows, C, 1, /*largest=*/true, /*sorted=*/true))
                     : std::get<0>(rows.sort(1, /*descending=*/true));              // (n, C)
    // softmax(sorted row) = exp(v - max) / sum of exp(x - max) over the whole row, in float64 so
    // that neither the summation order nor the sort moves which token crosses top_p: candidates'
    // exps in float64, the mass outside them from float32 exps (summed in float64).
    auto mx = top.narrow(1, 0, 1);                                                  // (n, 1): the row max
    auto num = (top.to(at::kDouble) - mx.to(at::kDouble)).exp_();                   // (n, C)
    auto outside = (rows - mx).exp_().sum(1, /*keepdim=*/true, at::kDouble) -
                   (top - mx).exp_().sum(1, /*keepdim=*/true, at::kDouble);         // (n, 1)
    auto probs = num / (num.sum(1, /*keepdim=*/true) + outside.clamp_min(0));       // (n, C)
    auto cum = probs.cumsum(1);
    auto before = cum - probs;                                                      // mass strictly before
    std::vector<double> pv;
    for (int64_t r : now) pv.push_back(params[r].top_p);
    auto pt = at::tensor(pv, at::kDouble).to(dev).unsqueeze(1);                     // (n, 1)
    auto n_keep = (before < pt).sum(1, /*keepdim=*/true).clamp_min(1);              // (n, 1)
    auto thr = top.gather(1, n_keep - 1);                                           // (n, 1)
    // Covered: the candidates' mass reaches top_p (then the nucleus ends inside them), or C = V.
    // Not covered: 16x the candidates while under V / 8, or the full sort when the candidates hold
    // less than half of top_p (a flat row, which more candidates would hardly cover).
    auto mass = cum.select(1, C - 1).to(at::kCPU).contiguous();
    const double* m = mass.data_ptr<double>();
    std::vector<int64_t> done_pos, done_rows;
    for (size_t i = 0; i < now.size(); ++i) {
      const int64_t r = now[i];
      if (C >= V || m[i] >= pv[i]) {
        done_pos.push_back(static_cast<int64_t>(i));
        done_rows.push_back(r);
      } else {
        cands[r] = C * 16 < V / 8 && m[i] >= 0.5 * pv[i] ? C * 16 : V;
        later.push_back(r);
      }
    }
    if (!done_pos.empty())
      thr_all.index_copy_(0, at::tensor(done_rows, at::kLong).to(dev),
                          thr.index_select(0, at::tensor(done_pos, at::kLong).to(dev)));
    todo.swap(later);
  }
  x.masked_fill_(x < thr_all, kNegInf);
}

namespace {

// Buckets of nucleus_threshold: 1/64 nat wide over the 32 nats below the row's max, then one for
// everything lower (and -inf).
constexpr int64_t kPerNat = 64, kNats = 32, kBuckets = kPerNat * kNats + 1;

// The bucket of value v in a row whose max is m: non-increasing in v (float subtraction and the
// power-of-two scale are monotone), so every value of bucket b is >= every value of bucket b + 1.
// Branch-free; 32 nats or more below the max, -inf and NaN go to the last bucket.
inline int64_t bucket_of(float m, float v) {
  const float d = m - v;
  const float c = d < static_cast<float>(kNats) ? d : static_cast<float>(kNats);
  return static_cast<int64_t>(c * static_cast<float>(kPerNat));
}

// One CPU row's nucleus threshold without sorting the row: the value of the last kept token (keep
// every column >= it; ties kept), or -inf to keep them all. The definition is the full sort's
// (descending order, keep a token while the float64 mass strictly before it is below top_p, the
// first always). The row's exps exp(x - max) are taken in float64 into `e` (vectorised ATen ops),
// summed to Z and into per-bucket masses; the bucket where the running mass reaches top_p * Z is
// the only one sorted, and the scan goes on token by token from there. Only the summation order
// differs from the sorted cumsum (~1e-16 relative).
float nucleus_threshold(const at::Tensor& row, double top_p, at::Tensor& e, std::vector<double>& mass,
                        std::vector<std::pair<float, double>>& members) {
  const int64_t V = row.size(0);
  const float m = row.max().item<float>();
  if (!(m > kNegInf)) return kNegInf;  // nothing finite (or NaN): nothing to choose from
  e.copy_(row).sub_(static_cast<double>(m)).exp_();  // (V) float64
  const double Z = e.sum().item<double>();
  const float* x = row.data_ptr<float>();
  const double* ep = e.data_ptr<double>();
  // Four interleaved copies of the bucket masses, so that runs of one bucket (peaky rows put most
  // tokens in the last) are four independent chains of adds, then summed.
  mass.assign(static_cast<size_t>(4 * kBuckets), 0.0);
  double* mp = mass.data();
  int64_t j = 0;
  for (; j + 4 <= V; j += 4) {
    mp[bucket_of(m, x[j])] += ep[j];
    mp[kBuckets + bucket_of(m, x[j + 1])] += ep[j + 1];
    mp[2 * kBuckets + bucket_of(m, x[j + 2])] += ep[j + 2];
    mp[3 * kBuckets + bucket_of(m, x[j + 3])] += ep[j + 3];
  }
  for (; j < V; ++j) mp[bucket_of(m, x[j])] += ep[j];
  for (int64_t b = 0; b < kBuckets; ++b) mp[b] = (mp[b] + mp[kBuckets + b]) + (mp[2 * kBuckets + b] + mp[3 * kBuckets + b]);
  const double target = top_p * Z;
  double acc = 0;  // mass of the tokens kept so far
  float thr = kNegInf;
  for (int64_t b = 0; b < kBuckets; ++b) {
    if (mass[b] == 0.0 && b + 1 < kBuckets) continue;  // empty (only the last can hold exps that underflow)
    if (acc >= target) return thr;  // the mass before this bucket's first token reaches top_p
    if (acc + mass[b] < target) {  // the whole bucket is kept; the next one's first token is kept too
      acc += mass[b];
      continue;
    }
    members.clear();
    for (int64_t k = 0; k < V; ++k)
      if (bucket_of(m, x[k]) == b) members.emplace_back(x[k], ep[k]);
    std::sort(members.begin(), members.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
    for (const auto& [v, w] : members) {
      if (acc >= target) return thr;  // the mass before this token reaches top_p
      thr = v;
      acc += w;
    }
  }
  return kNegInf;  // top_p * Z never reached (rounding, top_p near 1): every token is kept
}

}  // namespace

void apply_top_p_(at::Tensor& x, const std::vector<SamplingParams>& params) {
  if (!any_top_p(params)) return;
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || !x.is_contiguous()) {
    apply_top_p_sorting_(x, params);
    return;
  }
  // CPU: per row, a bucketed pass instead of a sort (nucleus_threshold); rows in parallel.
  const int64_t R = x.size(0), V = x.size(1);
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    at::Tensor e = at::empty({V}, x.options().dtype(at::kDouble));
    std::vector<double> mass;
    std::vector<std::pair<float, double>> members;
    for (int64_t r = begin; r < end; ++r) {
      const auto& p = params[r];
      if (p.greedy() || p.top_p >= 1.0) continue;
      at::Tensor row = x[r];
      const float thr = nucleus_threshold(row, p.top_p, e, mass, members);
      float* v = row.data_ptr<float>();
      for (int64_t j = 0; j < V; ++j) v[j] = v[j] < thr ? kNegInf : v[j];
    }
  });
}

at::Tensor draw(const at::Tensor& x, const std::vector<SamplingParams>& params, const std::vector<double>& uniforms) {
  const int64_t R = x.size(0);
  bool all_greedy = true, any_greedy = false;
  for (const auto& p : params) {
    all_greedy = all_greedy && p.greedy();
    any_greedy = any_greedy || p.greedy();
  }
  auto argmax = any_greedy ? x.argmax(1) : at::Tensor();  // (R)
  if (all_greedy) return argmax;
  // Inverse CDF: the first column whose cumulative (unnormalised) mass reaches u * total, summed in
  // float64 as the plain rows' scan and the device loop's sampler do (a float32 running sum over
  // 152k columns drifts enough to move some draws by a token).
  auto w = (x - std::get<0>(x.max(1, /*keepdim=*/true))).exp();  // (R, V), 0 where -inf
  auto cdf = w.to(at::kDouble).cumsum(1);
  auto target = at::tensor(uniforms, at::kDouble).to(x.device()).unsqueeze(1) * cdf.narrow(1, cdf.size(1) - 1, 1);  // (R, 1)
  auto picked = at::searchsorted(cdf, target).squeeze(1).clamp_max(x.size(1) - 1);  // (R)
  if (!any_greedy) return picked;
  std::vector<uint8_t> g(R);
  for (int64_t r = 0; r < R; ++r) g[r] = params[r].greedy();
  return at::where(at::tensor(g, at::kByte).to(x.device(), at::kBool), argmax, picked);
}

namespace {

// The inverse CDF of one row of weights w[0, lim) at uniform u, by a scan: the first column whose
// running mass (in double) reaches u * the row's mass; block sums skip ahead to the block where it
// crosses. -1 when the row's mass is below 1e-26 (its allowed columns underflow: redo it).
int64_t inverse_cdf(const float* row, int64_t lim, double u) {
  auto sum4 = [](const float* p, int64_t n) {  // four chains: not bound by one add's latency
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    const float* e = p + n;
    for (; e - p >= 4; p += 4) a0 += p[0], a1 += p[1], a2 += p[2], a3 += p[3];
    for (; p < e; ++p) a0 += *p;
    return (a0 + a1) + (a2 + a3);
  };
  constexpr int64_t kBlock = 256;
  const double total = sum4(row, lim);
  if (!(total > 1e-26)) return -1;
  const double target = u * total;
  double acc = 0;
  int64_t j = 0;
  for (; j + kBlock <= lim; j += kBlock) {
    const double b = sum4(row + j, kBlock);
    if (acc + b >= target) break;
    acc += b;
  }
  for (; j < lim - 1; ++j) {
    acc += row[j];
    if (acc >= target) break;
  }
  return j;
}

// Rows drawn without the top-k / top-p filters (greedy rows too): what the general chain computes,
// in fewer passes over the (R, V) logits and without copying them: y = logits / T, one max, one
// exp, one sum (the full softmax's normaliser), then the inverse CDF over the first vocab_limit
// columns of the same exp(y - max) weights (proportional to the limited softmax). A row whose
// allowed columns all underflow there (their max over 60 nats below the row's) is listed in
// `redo` for the general chain, which takes its max over the allowed columns only.
Drawn sample_plain(const at::Tensor& logits, const std::vector<SamplingParams>& params,
                   const std::vector<double>& uniforms, int64_t vocab_limit, std::vector<int64_t>* redo) {
  const int64_t R = logits.size(0), V = logits.size(1);
  const int64_t lim = vocab_limit > 0 && vocab_limit < V ? vocab_limit : V;
  auto dev = logits.device();
  std::vector<float> inv(R);
  bool all_one = true, any_greedy = false, all_greedy = true;
  for (int64_t r = 0; r < R; ++r) {
    inv[r] = params[r].greedy() ? 1.0f : static_cast<float>(1.0 / params[r].temperature);
    all_one = all_one && inv[r] == 1.0f;
    any_greedy = any_greedy || params[r].greedy();
    all_greedy = all_greedy && params[r].greedy();
  }
  if (dev.is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous()) {
    // CPU, row by row: the same ops on one row at a time, into two row buffers each thread reuses
    // (no (R, V) temporary: it would be fresh pages every call, and the row stays in L2).
    std::vector<int64_t> picked(R, 0);
    std::vector<float> lp(R, 0.0f);
    std::vector<uint8_t> under(R, 0);
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      at::Tensor yb = at::empty({V}, logits.options()), w = at::empty({V}, logits.options());
      for (int64_t r = begin; r < end; ++r) {
        at::Tensor y = logits[r];
        if (inv[r] != 1.0f) y = at::mul_out(yb, y, at::scalar_tensor(inv[r], logits.options()));
        const float m = y.max().item<float>();
        at::sub_out(w, y, at::scalar_tensor(m, logits.options())).exp_();
        const float lse = w.sum().log_().item<float>() + m;
        if (params[r].greedy()) {
          picked[r] = y.narrow(0, 0, lim).argmax().item<int64_t>();
        } else {
          picked[r] = inverse_cdf(w.data_ptr<float>(), lim, uniforms[r]);
          if (picked[r] < 0) {
            under[r] = 1;
            picked[r] = 0;
          }
        }
        lp[r] = y.data_ptr<float>()[picked[r]] - lse;
      }
    });
    for (int64_t r = 0; r < R; ++r)
      if (under[r]) redo->push_back(r);
    Drawn d;
    d.ids = at::tensor(picked, at::kLong);
    d.logprobs = at::tensor(lp, at::kFloat);
    return d;
  }
  auto y = logits.to(at::kFloat);  // no copy for float32 logits: y is only read
  if (!all_one) y = y * at::tensor(inv, at::kFloat).to(dev).unsqueeze(1);
  auto m = std::get<0>(y.max(1, /*keepdim=*/true));                         // (R, 1)
  auto w = (y - m).exp_();                                                  // (R, V)
  auto lse = w.sum(1).log_() + m.squeeze(1);                                // (R)
  auto argmax = any_greedy ? y.narrow(1, 0, lim).argmax(1) : at::Tensor();  // (R)
  at::Tensor ids;
  if (all_greedy) {
    ids = argmax;
  } else if (dev.is_cpu()) {
    auto wc = w.contiguous();
    const float* wp = wc.data_ptr<float>();
    const int64_t* ap = any_greedy ? argmax.data_ptr<int64_t>() : nullptr;
    std::vector<int64_t> picked(R, 0);
    for (int64_t r = 0; r < R; ++r) {
      if (params[r].greedy()) {
        picked[r] = ap[r];
        continue;
      }
      picked[r] = inverse_cdf(wp + r * V, lim, uniforms[r]);
      if (picked[r] < 0) {
        redo->push_back(r);
        picked[r] = 0;
      }
    }
    ids = at::tensor(picked, at::kLong);
  } else {
    auto cdf = w.narrow(1, 0, lim).cumsum(1);
    auto last = cdf.narrow(1, lim - 1, 1);  // (R, 1)
    std::vector<float> u(uniforms.begin(), uniforms.end());
    auto target = at::tensor(u, at::kFloat).to(dev).unsqueeze(1) * last;
    ids = at::searchsorted(cdf, target).squeeze(1).clamp_max(lim - 1);
    if (any_greedy) {
      std::vector<uint8_t> g(R);
      for (int64_t r = 0; r < R; ++r) g[r] = params[r].greedy();
      ids = at::where(at::tensor(g, at::kByte).to(dev, at::kBool), argmax, ids);
    }
    auto small = (last.squeeze(1) <= 1e-26).to(at::kCPU).contiguous();
    const bool* sp = small.data_ptr<bool>();
    for (int64_t r = 0; r < R; ++r)
      if (sp[r] && !params[r].greedy()) redo->push_back(r);
  }
  Drawn d;
  d.ids = ids;
  d.logprobs = y.gather(1, ids.unsqueeze(1)).squeeze(1) - lse;
  return d;
}

// The general chain: temperature -> vocabulary limit -> top-k -> top-p -> draw.
Drawn sample_chain(const at::Tensor& logits, const std::vector<SamplingParams>& params,
                   const std::vector<double>& uniforms, int64_t vocab_limit) {
  auto x = apply_temperature(logits, params);  // (R, V) float32, our own copy
  auto lse = at::logsumexp(x, 1);              // (R): normaliser of the full softmax, before any filter
  limit_vocab_(x, vocab_limit);
  apply_top_k_(x, params);
  apply_top_p_(x, params);
  Drawn d;
  d.ids = draw(x, params, uniforms);
  // The chosen column is never filtered out, so x still holds its scaled logit.
  d.logprobs = x.gather(1, d.ids.unsqueeze(1)).squeeze(1) - lse;
  return d;
}

// Rows `rows` of the batch through `f`, written into `out` at those rows.
template <class F>
void run_rows(const at::Tensor& logits, const std::vector<SamplingParams>& params, const std::vector<double>& uniforms,
              const std::vector<int64_t>& rows, Drawn& out, F&& f) {
  if (rows.empty()) return;
  const int64_t R = logits.size(0);
  if (static_cast<int64_t>(rows.size()) == R) {
    out = f(logits, params, uniforms);
    return;
  }
  std::vector<SamplingParams> p;
  std::vector<double> u;
  for (int64_t r : rows) {
    p.push_back(params[r]);
    u.push_back(uniforms[r]);
  }
  auto idx = at::tensor(rows, at::kLong).to(logits.device());
  Drawn d = f(logits.index_select(0, idx), p, u);
  if (!out.ids.defined()) {
    out.ids = at::zeros({R}, d.ids.options());
    out.logprobs = at::zeros({R}, d.logprobs.options());
  }
  out.ids.index_copy_(0, idx.to(out.ids.device()), d.ids.to(out.ids.device()));
  out.logprobs.index_copy_(0, idx.to(out.logprobs.device()), d.logprobs);
}

}  // namespace

Drawn sample_rows(const at::Tensor& logits, const std::vector<SamplingParams>& params,
                  const std::vector<double>& uniforms, int64_t vocab_limit) {
  PTK_CHECK(logits.dim() == 2 && static_cast<int64_t>(params.size()) == logits.size(0) &&
                uniforms.size() == params.size(),
            "sample_rows: logits (R, V) with one SamplingParams and one uniform per row");
  at::NoGradGuard no_grad;
  // Which path a row takes depends on its own parameters (and, for the rare redo, its own logits),
  // never on the other rows: a row's draw is the same in any batch.
  std::vector<int64_t> plain, filtered, redo;
  for (int64_t r = 0; r < static_cast<int64_t>(params.size()); ++r) {
    const auto& p = params[r];
    (p.greedy() || (p.top_k == 0 && p.top_p >= 1.0) ? plain : filtered).push_back(r);
  }
  Drawn d;
  run_rows(logits, params, uniforms, plain, d, [&](const at::Tensor& l, const auto& p, const auto& u) {
    std::vector<int64_t> local;
    Drawn x = sample_plain(l, p, u, vocab_limit, &local);
    for (int64_t i : local) redo.push_back(plain[i]);
    return x;
  });
  for (int64_t r : redo) filtered.push_back(r);
  std::sort(filtered.begin(), filtered.end());
  run_rows(logits, params, uniforms, filtered, d, [&](const at::Tensor& l, const auto& p, const auto& u) {
    return sample_chain(l, p, u, vocab_limit);
  });
  return d;
}

}  // namespace ptk::rollout
