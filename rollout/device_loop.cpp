// The device-resident decode loop (device_loop.h): persistent slot state, the packed transfers,
// tensor-op sampling and, on CUDA, one captured graph per slot-count n. Not the scheduler.
#include "rollout/device_loop.h"

#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>

#include "core/model/kv_cache.h"
#include "core/model/qwen2.h"
#include "core/runtime/log.h"
#include "core/util/error.h"
#include "core/util/strings.h"

#if PTK_TORCH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace ptk::rollout {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A slot's row of DeviceLoop::state_ (int64 each; float64 values stored as their bits).
enum Field : int64_t { kToken, kPos, kActive, kSeed, kSample, kStep, kInvTemp, kGreedy, kTopK, kTopP, kFields };

int64_t bits_of(double d) {
  int64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
}

// x >> k with zeros shifted in (ATen's >> on int64 is arithmetic).
at::Tensor shift_right_logical(const at::Tensor& x, int64_t k) {
  return at::bitwise_right_shift(x, k).bitwise_and_((int64_t{1} << (64 - k)) - 1);
}

// splitmix64 (sampling.cpp) on int64 tensors: +, * and ^ wrap exactly as on uint64.
at::Tensor splitmix64_tensor(const at::Tensor& x0) {
  auto x = x0 + static_cast<int64_t>(0x9E3779B97F4A7C15ull);
  x = x.bitwise_xor(shift_right_logical(x, 30)).mul_(static_cast<int64_t>(0xBF58476D1CE4E5B9ull));
  x = x.bitwise_xor(shift_right_logical(x, 27)).mul_(static_cast<int64_t>(0x94D049BB133111EBull));
  return x.bitwise_xor(shift_right_logical(x, 31));
}

}  // namespace

at::Tensor sample_uniform_tensor(const at::Tensor& seed, const at::Tensor& sample, const at::Tensor& step) {
  auto h = splitmix64_tensor(seed);
  h = splitmix64_tensor(h.bitwise_xor(sample));
  h = splitmix64_tensor(h.bitwise_xor(step * static_cast<int64_t>(0xD1B54A32D192ED03ull)));
  // 53 random bits, centred in their bucket (exact in float64).
  return (shift_right_logical(h, 11).to(at::kDouble) + 0.5) * (1.0 / 9007199254740992.0);
}

Drawn sample_rows_tensor(const at::Tensor& logits, const RowSampling& s, int64_t vocab_limit, bool filters) {
  at::NoGradGuard no_grad;
  PTK_CHECK(logits.dim() == 2, "sample_rows_tensor: logits must be (R, V)");
  const int64_t V = logits.size(1);
  const int64_t lim = vocab_limit > 0 && vocab_limit < V ? vocab_limit : V;
  auto x = logits.to(at::kFloat) * s.inv_temperature.unsqueeze(1);  // (R, V) float32, as apply_temperature
  auto lse = at::logsumexp(x, 1);                                    // (R): the full softmax's normaliser
  auto xl = x.narrow(1, 0, lim);                                     // (R, lim): the columns that may be drawn
  auto greedy_ids = xl.argmax(1);                                    // (R)
  at::Tensor xf = xl;
  if (filters) {
    const auto neg_inf = at::full({1, 1}, kNegInf, x.options());
    const auto sampled = s.greedy.logical_not().unsqueeze(1);                             // (R, 1)
    auto sorted = std::get<0>(xl.sort(1, /*descending=*/true));                           // (R, lim)
    // top-k: keep values >= the k-th largest (ties kept); off for k = 0 and k >= lim.
    const auto k_on = s.top_k.gt(0).logical_and(s.top_k.lt(lim)).unsqueeze(1).logical_and(sampled);
    auto thr_k = at::where(k_on, sorted.gather(1, (s.top_k - 1).clamp(0, lim - 1).unsqueeze(1)), neg_inf);  // (R, 1)
    sorted = sorted.masked_fill(sorted < thr_k, kNegInf);  // still descending
    // top-p over what top-k kept: keep a token while the float64 mass strictly before it is below
    // top_p (the first always), then every value >= the last kept one.
    auto mx = sorted.narrow(1, 0, 1).to(at::kDouble);
    auto num = (sorted.to(at::kDouble) - mx).exp_();                              // (R, lim)
    auto probs = num / num.sum(1, /*keepdim=*/true);
    auto before = probs.cumsum(1) - probs;
    auto n_keep = before.lt(s.top_p.unsqueeze(1)).sum(1, /*keepdim=*/true).clamp_min(1);  // (R, 1)
    const auto p_on = s.top_p.lt(1.0).unsqueeze(1).logical_and(sampled);
    auto thr_p = at::where(p_on, sorted.gather(1, n_keep - 1), neg_inf);
    xf = xl.masked_fill(xl < at::maximum(thr_k, thr_p), kNegInf);
  }
  // Inverse CDF: the first column whose float64 cumulative mass reaches u x the row's mass.
  auto w = (xf - std::get<0>(xf.max(1, /*keepdim=*/true))).exp_();  // (R, lim), 0 where -inf
  auto cdf = w.to(at::kDouble).cumsum(1);
  auto target = s.uniform.unsqueeze(1) * cdf.narrow(1, lim - 1, 1);  // (R, 1)
  auto picked = at::searchsorted(cdf, target).squeeze(1).clamp_max(lim - 1);
  Drawn d;
  d.ids = at::where(s.greedy, greedy_ids, picked);
  d.logprobs = x.gather(1, d.ids.unsqueeze(1)).squeeze(1) - lse;
  return d;
}

int64_t cache_slots_that_fit(int64_t wanted, int64_t bytes_per_slot, double fraction, size_t free_bytes,
                             size_t total_bytes) {
  PTK_CHECK(wanted >= 1 && bytes_per_slot >= 1, "cache_slots_that_fit: wanted and bytes_per_slot must be >= 1");
  PTK_CHECK(fraction > 0.0 && fraction <= 1.0, "cache_slots_that_fit: fraction must be in (0, 1]");
  const double in_use = static_cast<double>(total_bytes) - static_cast<double>(free_bytes);
  const double budget = fraction * static_cast<double>(total_bytes) - in_use;
  const double fit = budget > 0 ? std::floor(budget / static_cast<double>(bytes_per_slot)) : 0.0;
  if (fit < 1.0) {
    throw Error("rollout engine: not even one KV-cache slot fits: rollout.gpu_memory_fraction " +
                std::to_string(fraction).substr(0, 5) + " x " + format_bytes(static_cast<double>(total_bytes)) + " total - " +
                format_bytes(in_use) + " in use leaves " + format_bytes(budget > 0 ? budget : 0) + ", one slot needs " +
                format_bytes(static_cast<double>(bytes_per_slot)) +
                "\n---> HINT: raise rollout.gpu_memory_fraction, shorten max_prompt_length + max_completion_length, "
                "or free GPU memory (a smaller micro-batch, LoRA, a CPU reference)");
  }
  return fit >= static_cast<double>(wanted) ? wanted : static_cast<int64_t>(fit);
}

// ---- DeviceLoop ---------------------------------------------------------------------------------

#if PTK_TORCH_CUDA
struct DeviceLoop::Graphs {
  std::map<std::pair<int64_t, int64_t>, std::unique_ptr<at::cuda::CUDAGraph>> by_shape;  // (n, kv_len)
  c10::MempoolId_t pool{0, 0};  // the first graph's pool, shared by the later ones
};
#else
struct DeviceLoop::Graphs {};
#endif

DeviceLoop::DeviceLoop(const model::Qwen2Model& model, model::KVCache& cache, int64_t vocab_limit, bool filters,
                       bool cuda_graphs)
    : model_(model), cache_(cache), vocab_limit_(vocab_limit), filters_(filters), S_(cache.slots()) {
  at::NoGradGuard no_grad;
  const at::Device dev = model.embed_tokens_.device();
  graphs_on_ = cuda_graphs && dev.is_cuda();
#if !PTK_TORCH_CUDA
  graphs_on_ = false;
#endif
  graphs_ = std::make_unique<Graphs>();
  auto [inv_freq, scale] = model::rope_inv_freq(model.config());
  inv_freq_ = inv_freq.to(dev);  // once per call: decode_step reads it from the device
  rope_scale_ = scale;
  const auto on_dev = at::TensorOptions().dtype(at::kLong).device(dev);
  const auto on_host = at::TensorOptions().dtype(at::kLong).pinned_memory(dev.is_cuda());
  state_ = at::zeros({S_, kFields}, on_dev);
  state_.select(1, kInvTemp).fill_(bits_of(1.0));
  state_.select(1, kTopP).fill_(bits_of(1.0));
  stage_host_ = at::empty({S_, 1 + kFields}, on_host);
  stage_dev_ = at::empty({S_, 1 + kFields}, on_dev);
  out_dev_ = at::zeros({S_, 2}, on_dev);
  out_host_ = at::empty({S_, 2}, on_host);
  staged_row_.assign(static_cast<size_t>(S_), -1);
  rows_.resize(static_cast<size_t>(S_));
}

DeviceLoop::~DeviceLoop() = default;  // graphs (and their pool) go first: the last step synchronised

void DeviceLoop::admit(int64_t slot, int64_t token, int64_t position, uint64_t seed, int64_t sample, int64_t step,
                       const SamplingParams& p) {
  PTK_CHECK(slot >= 0 && slot < S_ && position >= 0 && position < cache_.max_len(),
            "DeviceLoop::admit: slot or position out of range");
  int64_t& r = staged_row_[static_cast<size_t>(slot)];
  if (r < 0) r = staged_++;  // a slot staged twice before a step keeps one row (the latest)
  int64_t* row = stage_host_.data_ptr<int64_t>() + r * (1 + kFields);
  row[0] = slot;
  int64_t* f = row + 1;
  f[kToken] = token;
  f[kPos] = position;
  f[kActive] = 1;
  f[kSeed] = static_cast<int64_t>(seed);
  f[kSample] = sample;
  f[kStep] = step;
  // float(1 / T) as apply_temperature takes it; stored exactly as a float64.
  f[kInvTemp] = bits_of(p.greedy() ? 1.0 : static_cast<double>(static_cast<float>(1.0 / p.temperature)));
  f[kGreedy] = p.greedy() ? 1 : 0;
  f[kTopK] = p.greedy() ? 0 : p.top_k;
  f[kTopP] = bits_of(p.greedy() ? 1.0 : p.top_p);
}

void DeviceLoop::release(int64_t slot) {
  admit(slot, 0, 0, 0, 0, 0, SamplingParams{0.0, 1.0, 0});
  stage_host_.data_ptr<int64_t>()[staged_row_[static_cast<size_t>(slot)] * (1 + kFields) + 1 + kActive] = 0;
}

void DeviceLoop::apply_staged() {
  if (staged_ == 0) return;
  // The one host->device copy of a step (pinned: asynchronous; the host writes the staging buffer
  // again only after this step's device->host copy, which waits for it).
  auto rows = stage_dev_.narrow(0, 0, staged_);
  rows.copy_(stage_host_.narrow(0, 0, staged_), /*non_blocking=*/true);
  ++h2d_copies;
  state_.index_copy_(0, rows.select(1, 0), rows.narrow(1, 1, kFields));
  for (auto& r : staged_row_) r = -1;
  staged_ = 0;
}

void DeviceLoop::body(int64_t n, int64_t kv_len) {
  auto st = state_.narrow(0, 0, n);  // (n, kFields)
  auto token = st.select(1, kToken), pos = st.select(1, kPos), active = st.select(1, kActive);
  auto step = st.select(1, kStep);
  auto logits = model_.decode_step(token, pos, inv_freq_, rope_scale_, cache_, kv_len);  // (n, V)
  RowSampling rs;
  rs.inv_temperature = st.select(1, kInvTemp).view(at::kDouble).to(at::kFloat);
  rs.greedy = st.select(1, kGreedy).ne(0);
  rs.top_k = st.select(1, kTopK);
  rs.top_p = st.select(1, kTopP).view(at::kDouble);
  rs.uniform = sample_uniform_tensor(st.select(1, kSeed), st.select(1, kSample), step);
  Drawn d = sample_rows_tensor(logits, rs, vocab_limit_, filters_);
  // Active slots feed their new token next, one position further; idle ones stay put.
  token.copy_(at::where(active.ne(0), d.ids, token));
  pos.add_(active);
  step.add_(active);
  auto out = out_dev_.narrow(0, 0, n);
  out.select(1, 0).copy_(d.ids);
  out.select(1, 1).copy_(d.logprobs.to(at::kDouble).view(at::kLong));
}

const std::vector<DeviceLoop::Row>& DeviceLoop::step(int64_t n, int64_t kv_len) {
  PTK_CHECK(n >= 1 && n <= S_, "DeviceLoop::step: n must be in [1, slots]");
  if (kv_len == 0) kv_len = cache_.max_len();
  PTK_CHECK(kv_len >= 1 && kv_len <= cache_.max_len(), "DeviceLoop::step: kv_len must be in [1, max_len]");
  at::NoGradGuard no_grad;
  apply_staged();
  bool ran = false;
#if PTK_TORCH_CUDA
  if (graphs_on_) {
    const c10::DeviceIndex dev = model_.embed_tokens_.device().index();
    c10::cuda::CUDAGuard device_guard(dev);  // replay and capture on the model's device
    auto it = graphs_->by_shape.find({n, kv_len});
    if (it != graphs_->by_shape.end()) {
      it->second->replay();  // on the current stream
      ++graph_replays;
      ran = true;
    } else {
      // First use of n: the step runs eagerly on the side stream the capture will use (the real
      // step, and the warm-up PyTorch asks for: per-stream state such as cuBLAS workspaces is made
      // there before capture), then the same body is captured there, which executes nothing.
      auto current = c10::cuda::getCurrentCUDAStream(dev);
      auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, dev);
      c10::cuda::CUDAEvent ready;
      ready.record(current);
      ready.block(side);
      auto graph = std::make_unique<at::cuda::CUDAGraph>();
      bool captured_ok = false;
      {
        c10::cuda::CUDAStreamGuard guard(side);
        body(n, kv_len);
        ran = true;  // the real step ran; the capture below executes nothing
        try {
          // Thread-local: other threads' CUDA calls (NCCL's watchdog, data loaders) do not break it.
          graph->capture_begin(graphs_->pool, cudaStreamCaptureModeThreadLocal);
          try {
            body(n, kv_len);
          } catch (...) {
            try {
              graph->capture_end();  // ends the capture and the allocator's routing into its pool
            } catch (...) {
            }
            throw;
          }
          graph->capture_end();
          captured_ok = true;
        } catch (const std::exception& e) {
          // Something in the step cannot be captured on this GPU / LibTorch: decode eagerly from now
          // on (the results are the same; only launch overhead is lost).
          cudaGetLastError();  // clear a sticky capture error for the next CUDA call
          graphs_on_ = false;
          log::warn(std::string("rollout engine: CUDA graph capture failed, decoding without graphs "
                                "(rollout.cuda_graphs=false silences this): ") + e.what());
        }
      }
      c10::cuda::CUDAEvent captured;
      captured.record(side);
      captured.block(current);  // the device->host copy below, on `current`, waits for the step
      if (captured_ok) {
        if (graphs_->by_shape.empty()) graphs_->pool = graph->pool();
        graphs_->by_shape.emplace(std::make_pair(n, kv_len), std::move(graph));
        ++graph_captures;
      }
    }
  }
#endif
  if (!ran) body(n, kv_len);
  // The one device->host copy of a step; it waits for the step (and makes the host wait).
  auto host = out_host_.narrow(0, 0, n);
  host.copy_(out_dev_.narrow(0, 0, n));
  ++d2h_copies;
  const int64_t* p = host.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    rows_[static_cast<size_t>(r)].id = p[2 * r];
    std::memcpy(&rows_[static_cast<size_t>(r)].logprob, p + 2 * r + 1, sizeof(double));
  }
  return rows_;
}

}  // namespace ptk::rollout
