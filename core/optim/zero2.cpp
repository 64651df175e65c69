// Zero2AdamW: post-accumulate-grad hooks (torch's optimizer-in-backward hook) move each gradient into
// its bucket and free .grad; buckets are reduce-scattered in a fixed order (the same on every rank:
// Gloo and NCCL match collectives by order), their chunks summed into one flat gradient shard; the
// shard's AdamW runs on 1-D views into the parameters (as ZeRO-1's), then one all-gather of every
// rank's chunks refreshes the parameters.
#include "core/optim/zero2.h"

#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "core/optim/shard_state.h"
#include "core/util/error.h"

namespace ptk::optim {

struct Zero2AdamW::Impl {
  struct Slot {              // one parameter
    int64_t flat = 0;        // its offset in the flattened parameters
    int64_t numel = 0;
    int bucket = -1;
    int64_t in_bucket = 0;   // its offset within the bucket
    bool ready = false;      // its gradient is in the bucket (this backward)
    bool used = false;       // a gradient arrived on this rank this step
  };
  struct Bucket {
    int64_t lo = 0, hi = 0;        // flat range [lo, hi)
    int64_t chunk = 0;             // elements per rank: ceil((hi - lo) / world)
    int64_t shard_offset = 0;      // where its chunk sits in `shard` (the same on every rank)
    std::vector<int> slots;
    int pending = 0;
    at::Tensor flat, out;          // (chunk * world,) and (chunk,): only while a backward is in flight
    parallel::Comm::Work work;
  };
  struct Segment {  // this rank's part of one parameter
    int slot;
    int64_t begin, end;     // within the flattened parameter
    int64_t shard_offset;   // of `begin` in `shard`
  };
  // Runs after AccumulateGrad has added a backward's gradient into .grad.
  struct Hook : torch::autograd::PostAccumulateGradHook {
    Hook(Impl* impl, int slot) : impl(impl), slot(slot) {}
    void operator()(const torch::autograd::Variable& param) override { impl->on_grad(slot, param); }
    Impl* impl;
    int slot;
  };

  parallel::Comm comm;
  NamedTensors params;
  at::TensorOptions opts;  // the parameters' dtype and device
  std::vector<Slot> slots;
  std::vector<Bucket> buckets;
  std::vector<Segment> segments;
  std::vector<ShardSlice> slices() const;  // the segments as the checkpoint names them
  NamedTensors views;  // (end - begin,) views into the parameters, AdamW's "parameters"
  std::unique_ptr<AdamW> adamw;
  at::Tensor shard;    // (shard_numel,) this rank's chunks of the summed gradient, the parameters' dtype
  int64_t total = 0, shard_numel = 0;
  int next_launch = 0, launched_early = 0;
  bool armed = false;
  bool used_known = false;      // used_any reduced over ranks for this step
  std::vector<char> used_any;   // per slot: a gradient on some rank this step

  void ensure_bucket(Bucket& b) {
    if (b.flat.defined()) return;
    const int64_t w = comm.world_size(), n = b.hi - b.lo;
    b.flat = at::empty({b.chunk * w}, opts);
    if (b.chunk * w > n) b.flat.narrow(0, n, b.chunk * w - n).zero_();
  }

  void launch_ready() {
    while (next_launch < static_cast<int>(buckets.size()) && buckets[next_launch].pending == 0) {
      Bucket& b = buckets[next_launch];
      b.out = at::empty({b.chunk}, opts);
      b.work = comm.reduce_scatter_async(b.flat, b.out);
      ++next_launch;
    }
  }

  void on_grad(int i, const at::Tensor& param) {
    if (!armed) return;  // a backward outside begin/end_backward keeps the plain .grad
    Slot& s = slots[i];
    PTK_CHECK(!s.ready, "ZeRO-2: parameter " + params[i].first +
                            " received two gradients in one backward (a reentrant backward?); its bucket may "
                            "already be on its way\n---> HINT: train.sharding=zero1 accumulates whole gradients");
    at::Tensor& g = param.mutable_grad();
    if (!g.defined()) return;
    torch::NoGradGuard ng;
    Bucket& b = buckets[s.bucket];
    ensure_bucket(b);
    b.flat.narrow(0, s.in_bucket, s.numel).copy_(dense_grad(g).reshape(-1));
    g.reset();  // the bucket holds it now: no whole gradient outlives its bucket
    s.ready = s.used = true;
    if (--b.pending == 0) {
      const int before = next_launch;
      launch_ready();
      launched_early += next_launch - before;
    }
  }

  // Which parameters had a gradient on any rank this step: one small host collective per step.
  void reduce_used() {
    if (used_known) return;
    at::Tensor u = at::zeros({static_cast<int64_t>(slots.size())}, at::TensorOptions().dtype(at::kFloat));
    float* up = u.data_ptr<float>();
    for (size_t i = 0; i < slots.size(); ++i) up[i] = slots[i].used ? 1.0f : 0.0f;
    comm.all_reduce(u, parallel::ReduceOp::kMax);
    up = u.data_ptr<float>();
    for (size_t i = 0; i < slots.size(); ++i) used_any[i] = up[i] > 0;
    used_known = true;
  }

  // The gradient shard's slices of the parameters some rank had a gradient for, in segment order.
  std::vector<at::Tensor> used_grads() const {
    std::vector<at::Tensor> out;
    for (const auto& seg : segments)
      if (used_any[seg.slot]) out.push_back(shard.narrow(0, seg.shard_offset, seg.end - seg.begin));
    return out;
  }
};

Zero2AdamW::Zero2AdamW(parallel::Comm comm, NamedTensors params, AdamWOptions opt, double bucket_mb)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.comm = comm;
  s.params = std::move(params);
  PTK_CHECK(!s.params.empty(), "ZeRO-2: no parameters");
  PTK_CHECK(bucket_mb > 0, "ZeRO-2: bucket_mb must be positive");
  const auto& first = s.params[0].second;
  s.opts = first.options().requires_grad(false);
  for (auto& [name, p] : s.params) {
    if (!p.is_contiguous() || p.scalar_type() != first.scalar_type() || p.device() != first.device() ||
        !p.requires_grad())
      throw Error("ZeRO-2: parameter " + name + " is " + std::string(p.is_contiguous() ? "" : "non-contiguous, ") +
                  std::string(p.requires_grad() ? "" : "frozen, ") + c10::toString(p.scalar_type()) + " on " +
                  p.device().str() + "; ZeRO-2 needs trainable contiguous parameters of one dtype and device"
                  "\n---> HINT: set train.sharding=none for this model");
    Impl::Slot slot;
    slot.flat = s.total;
    slot.numel = p.numel();
    s.slots.push_back(slot);
    s.total += p.numel();
  }
  s.used_any.assign(s.slots.size(), 0);
  const int64_t w = comm.world_size(), r = comm.rank();
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(bucket_mb * 1024 * 1024) / first.element_size());
  // Buckets in reverse parameter order (backward's order); each holds whole parameters, so its flat
  // range is contiguous.
  for (int i = static_cast<int>(s.params.size()) - 1; i >= 0; --i) {
    Impl::Slot& sl = s.slots[i];
    if (s.buckets.empty() || s.buckets.back().hi - s.buckets.back().lo + sl.numel > cap) {
      s.buckets.emplace_back();
      s.buckets.back().hi = sl.flat + sl.numel;
    }
    Impl::Bucket& b = s.buckets.back();
    b.lo = sl.flat;
    b.slots.push_back(i);
    sl.bucket = static_cast<int>(s.buckets.size()) - 1;
  }
  for (auto& b : s.buckets) {
    b.chunk = (b.hi - b.lo + w - 1) / w;
    b.shard_offset = s.shard_numel;
    s.shard_numel += b.chunk;
    for (int i : b.slots) s.slots[i].in_bucket = s.slots[i].flat - b.lo;
    // This rank's chunk, cut along the parameters it covers.
    const int64_t c0 = b.lo + r * b.chunk, c1 = std::min(b.hi, c0 + b.chunk);
    for (auto it = b.slots.rbegin(); it != b.slots.rend(); ++it) {
      const Impl::Slot& sl = s.slots[*it];
      const int64_t a = std::max(c0, sl.flat), e = std::min(c1, sl.flat + sl.numel);
      if (a >= e) continue;
      s.segments.push_back({*it, a - sl.flat, e - sl.flat, b.shard_offset + (a - c0)});
    }
  }
  torch::NoGradGuard ng;
  for (const auto& seg : s.segments)
    s.views.emplace_back(s.params[seg.slot].first,
                         s.params[seg.slot].second.detach().view(-1).slice(0, seg.begin, seg.end));
  s.adamw = std::make_unique<AdamW>(s.views, opt);
  s.shard = at::zeros({s.shard_numel}, s.opts);
  for (size_t i = 0; i < s.params.size(); ++i) {
    const at::Tensor& p = s.params[i].second;
    PTK_CHECK(!torch::autograd::impl::post_acc_grad_hooks(p),
              "ZeRO-2: parameter " + s.params[i].first + " already has a post-accumulate-grad hook");
    torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<Impl::Hook>(impl_.get(), static_cast<int>(i)));
  }
}

Zero2AdamW::~Zero2AdamW() {
  for (auto& [name, p] : impl_->params) {
    try {
      torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
    } catch (...) {
    }
  }
}

void Zero2AdamW::begin_backward() {
  Impl& s = *impl_;
  PTK_CHECK(!s.armed, "ZeRO-2: begin_backward() twice without end_backward()");
  for (auto& b : s.buckets) b.pending = static_cast<int>(b.slots.size());
  for (auto& sl : s.slots) sl.ready = false;
  s.next_launch = 0;
  s.launched_early = 0;
  s.armed = true;
}

void Zero2AdamW::end_backward() {
  Impl& s = *impl_;
  PTK_CHECK(s.armed, "ZeRO-2: end_backward() without begin_backward()");
  s.armed = false;
  torch::NoGradGuard ng;
  // Parameters this backward did not reach contribute zeros (every rank sends every bucket).
  for (auto& b : s.buckets) {
    if (b.pending == 0) continue;
    s.ensure_bucket(b);
    for (int i : b.slots) {
      Impl::Slot& sl = s.slots[i];
      if (sl.ready) continue;
      b.flat.narrow(0, sl.in_bucket, sl.numel).zero_();
      sl.ready = true;
    }
    b.pending = 0;
  }
  s.launch_ready();
  for (auto& b : s.buckets) {
    b.work.wait();
    s.shard.narrow(0, b.shard_offset, b.chunk).add_(b.out);
    b.flat = at::Tensor();
    b.out = at::Tensor();
  }
}

at::Tensor Zero2AdamW::clip_grad_norm(double max_norm) {
  Impl& s = *impl_;
  s.reduce_used();
  torch::NoGradGuard ng;
  std::vector<at::Tensor> grads = s.used_grads();
  at::Tensor sq = at::zeros({1}, s.opts.dtype(at::kDouble));
  if (!grads.empty()) {
    std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2, at::kFloat);  // fp32, as clip_grad_norm_
    sq = at::stack(norms).to(at::kDouble).square().sum().reshape({1});
  }
  s.comm.all_reduce_async(sq).wait();  // NCCL: ordered on the stream, no host wait
  at::Tensor norm = sq.sqrt().reshape({});
  if (max_norm <= 0 || grads.empty()) return norm;
  if (norm.is_cpu()) {
    const double n = norm.item<double>();
    if (!std::isfinite(n) || max_norm / (n + 1e-6) >= 1.0) return norm;
    at::_foreach_mul_(grads, at::Scalar(max_norm / (n + 1e-6)));
  } else {
    at::Tensor coef = at::clamp_max(max_norm / (norm + 1e-6), 1.0);
    coef = at::where(at::isfinite(norm), coef, at::ones_like(coef)).to(at::kFloat);
    at::_foreach_mul_(grads, coef);
  }
  return norm;
}

void Zero2AdamW::step(double lr) {
  Impl& s = *impl_;
  s.reduce_used();
  torch::NoGradGuard ng;
  for (size_t k = 0; k < s.segments.size(); ++k) {
    const auto& seg = s.segments[k];
    at::Tensor& v = s.views[k].second;
    if (s.used_any[seg.slot]) v.mutable_grad() = s.shard.narrow(0, seg.shard_offset, seg.end - seg.begin);
    else v.mutable_grad().reset();
  }
  s.adamw->step(lr);
  for (auto& [n, v] : s.views) v.mutable_grad().reset();
  const int w = s.comm.world_size(), r = s.comm.rank();
  if (w == 1) return;  // the views updated the parameters in place
  // This rank's chunk of every bucket, in shard order, then everyone's.
  at::Tensor mine = at::zeros({s.shard_numel}, s.opts);
  for (size_t k = 0; k < s.segments.size(); ++k)
    mine.narrow(0, s.segments[k].shard_offset, s.segments[k].end - s.segments[k].begin).copy_(s.views[k].second);
  at::Tensor all = s.comm.all_gather(mine);  // (world, shard_numel)
  for (int q = 0; q < w; ++q) {
    if (q == r) continue;
    const at::Tensor from = all[q];
    for (const auto& b : s.buckets) {
      const int64_t c0 = b.lo + q * b.chunk, c1 = std::min(b.hi, c0 + b.chunk);
      for (int i : b.slots) {
        const Impl::Slot& sl = s.slots[i];
        const int64_t a = std::max(c0, sl.flat), e = std::min(c1, sl.flat + sl.numel);
        if (a >= e) continue;
        s.params[i].second.detach().view(-1).slice(0, a - sl.flat, e - sl.flat).copy_(
            from.narrow(0, b.shard_offset + (a - c0), e - a));
      }
    }
  }
}

void Zero2AdamW::zero_grad() {
  Impl& s = *impl_;
  s.shard.zero_();
  for (auto& sl : s.slots) sl.used = false;
  s.used_known = false;
  for (auto& [name, p] : s.params)
    if (p.grad().defined()) p.mutable_grad().reset();
}

int64_t Zero2AdamW::steps() const { return impl_->adamw->steps(); }
int64_t Zero2AdamW::numel() const { return impl_->total; }
int64_t Zero2AdamW::shard_numel() const { return impl_->shard_numel; }
int Zero2AdamW::num_buckets() const { return static_cast<int>(impl_->buckets.size()); }
int Zero2AdamW::launched_during_backward() const { return impl_->launched_early; }
const AdamW& Zero2AdamW::local() const { return *impl_->adamw; }

std::vector<ShardSlice> Zero2AdamW::Impl::slices() const {
  std::vector<ShardSlice> out;
  for (const auto& seg : segments) out.push_back({params[seg.slot].first, seg.begin, seg.end});
  return out;
}

NamedTensors Zero2AdamW::state() const { return shard_state(impl_->adamw->state(), "zero2", impl_->slices()); }

void Zero2AdamW::load_state(const NamedTensors& tensors, int64_t step) {
  impl_->adamw->load_state(shard_moments(tensors, "zero2", impl_->slices(), "ZeRO-2", impl_->comm.rank(),
                                         "\n---> HINT: resume with the world size, model and train.sharding the checkpoint was written with"),
                           step);
}

}  // namespace ptk::optim
