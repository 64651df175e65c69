// Zero1AdamW: the shard's AdamW runs on 1-D views into the parameters (so the fused kernel updates
// them in place); an all-gather into a flat buffer then brings every rank's slice to everyone.
#include "core/optim/zero1.h"

#include <torch/torch.h>


#include "core/optim/shard_state.h"
#include "core/util/error.h"

namespace ptk::optim {

struct Zero1AdamW::Impl {
  struct Segment {
    int param;          // index into params
    int64_t begin, end;  // within the flattened parameter
  };
  parallel::Comm comm;
  NamedTensors params;
  std::vector<int64_t> offsets;  // flat offset of each parameter
  std::vector<Segment> segments;
  std::vector<ShardSlice> slices() const;  // the segments as the checkpoint names them
  NamedTensors views;  // (end - begin,) views into the parameters, AdamW's "parameters"
  std::unique_ptr<AdamW> adamw;
  int64_t total = 0, chunk = 0, begin = 0, end = 0;
  at::Tensor flat;  // (chunk * world,) gather buffer
};

Zero1AdamW::Zero1AdamW(parallel::Comm comm, NamedTensors params, AdamWOptions opt)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.comm = comm;
  s.params = std::move(params);
  PTK_CHECK(!s.params.empty(), "ZeRO-1: no parameters");
  const auto& first = s.params[0].second;
  for (auto& [name, p] : s.params) {
    if (!p.is_contiguous() || p.scalar_type() != first.scalar_type() || p.device() != first.device())
      throw Error("ZeRO-1: parameter " + name + " is " + std::string(p.is_contiguous() ? "" : "non-contiguous, ") +
                  c10::toString(p.scalar_type()) + " on " + p.device().str() + "; ZeRO-1 needs contiguous parameters "
                  "of one dtype and device\n---> HINT: set train.zero1=false for this model");
    s.offsets.push_back(s.total);
    s.total += p.numel();
  }
  const int64_t w = comm.world_size(), r = comm.rank();
  s.chunk = (s.total + w - 1) / w;
  s.begin = std::min(s.total, r * s.chunk);
  s.end = std::min(s.total, (r + 1) * s.chunk);
  torch::NoGradGuard ng;
  for (size_t i = 0; i < s.params.size(); ++i) {
    int64_t a = std::max(s.begin, s.offsets[i]), b = std::min(s.end, s.offsets[i] + s.params[i].second.numel());
    if (a >= b) continue;
    Impl::Segment seg{static_cast<int>(i), a - s.offsets[i], b - s.offsets[i]};
    s.segments.push_back(seg);
    s.views.emplace_back(s.params[i].first, s.params[i].second.detach().view(-1).slice(0, seg.begin, seg.end));
  }
  s.adamw = std::make_unique<AdamW>(s.views, opt);
  s.flat = at::zeros({s.chunk * w}, first.options().requires_grad(false));
}

Zero1AdamW::~Zero1AdamW() = default;

void Zero1AdamW::step(double lr) {
  Impl& s = *impl_;
  torch::NoGradGuard ng;
  for (size_t k = 0; k < s.segments.size(); ++k) {
    const auto& seg = s.segments[k];
    const at::Tensor& g = s.params[seg.param].second.grad();
    at::Tensor& v = s.views[k].second;
    if (g.defined()) v.mutable_grad() = dense_grad(g).reshape(-1).slice(0, seg.begin, seg.end);
    else v.mutable_grad().reset();
  }
  s.adamw->step(lr);
  for (auto& [n, v] : s.views) v.mutable_grad().reset();
  // All-gather: this rank's slice into its chunk of the flat buffer, everyone's chunks back out.
  const int w = s.comm.world_size();
  at::Tensor mine = s.flat.narrow(0, s.comm.rank() * s.chunk, s.chunk);
  for (size_t k = 0; k < s.segments.size(); ++k) {
    const auto& seg = s.segments[k];
    mine.narrow(0, s.offsets[seg.param] + seg.begin - s.begin, seg.end - seg.begin).copy_(s.views[k].second);
  }
  if (w == 1) return;
  std::vector<at::Tensor> chunks;
  for (int q = 0; q < w; ++q) chunks.push_back(s.flat.narrow(0, q * s.chunk, s.chunk));
  s.comm.all_gather(mine.clone(), chunks);
  for (size_t i = 0; i < s.params.size(); ++i) {
    at::Tensor p = s.params[i].second.detach().view(-1);
    p.copy_(s.flat.narrow(0, s.offsets[i], p.numel()));
  }
}

void Zero1AdamW::zero_grad() {
  for (auto& [name, p] : impl_->params)
    if (p.grad().defined()) p.mutable_grad().reset();
}

int64_t Zero1AdamW::steps() const { return impl_->adamw->steps(); }
int64_t Zero1AdamW::numel() const { return impl_->total; }
int64_t Zero1AdamW::shard_begin() const { return impl_->begin; }
int64_t Zero1AdamW::shard_end() const { return impl_->end; }
const AdamW& Zero1AdamW::local() const { return *impl_->adamw; }

std::vector<ShardSlice> Zero1AdamW::Impl::slices() const {
  std::vector<ShardSlice> out;
  for (const auto& seg : segments) out.push_back({params[seg.param].first, seg.begin, seg.end});
  return out;
}

NamedTensors Zero1AdamW::state() const { return shard_state(impl_->adamw->state(), "zero1", impl_->slices()); }

void Zero1AdamW::load_state(const NamedTensors& tensors, int64_t step) {
  impl_->adamw->load_state(shard_moments(tensors, "zero1", impl_->slices(), "ZeRO-1", impl_->comm.rank(),
                                         "\n---> HINT: resume with the world size and model the checkpoint was written with"),
                           step);
}

}  // namespace ptk::optim
