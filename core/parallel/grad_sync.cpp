// GradSync: per-parameter autograd hooks fill flattened buckets; a bucket's all-reduce starts as
// soon as it and every bucket before it are full, so every rank issues the same collectives in the
// same order (Gloo and NCCL match collectives by order). Not c10d's Reducer: that one is built for
// Python's DistributedDataParallel (module replicas, Python comm hooks); tensor hooks are all ptk needs.
#include "core/parallel/grad_sync.h"

#include <torch/torch.h>

#include "core/util/error.h"

namespace ptk::parallel {

struct GradSync::Impl {
  struct Slot {
    at::Tensor param;
    int bucket = -1;
    int64_t offset = 0, numel = 0;
    bool ready = false, has_grad = false;
    unsigned hook = 0;
  };
  struct Bucket {
    at::Tensor flat;  // (numel,) in the parameters' dtype and device
    std::vector<int> slots;
    int pending = 0;
    Comm::Work work;
  };
  Comm comm;
  std::vector<Slot> slots;
  std::vector<Bucket> buckets;
  int next_launch = 0;
  int launched_early = 0;
  bool armed = false;

  void launch_ready() {
    while (next_launch < static_cast<int>(buckets.size()) && buckets[next_launch].pending == 0) {
      buckets[next_launch].work = comm.all_reduce_async(buckets[next_launch].flat);
      ++next_launch;
    }
  }

  void on_grad(int i, const at::Tensor& g_in) {
    if (!armed) return;
    const at::Tensor g = optim::dense_grad(g_in);
    Slot& s = slots[i];
    PTK_CHECK(!s.ready, "GradSync: a gradient for " + std::to_string(i) + " arrived twice in one backward");
    torch::NoGradGuard ng;
    Bucket& b = buckets[s.bucket];
    at::Tensor dst = b.flat.narrow(0, s.offset, s.numel);
    const at::Tensor& acc = s.param.grad();  // earlier micro-batches of this step (hooks run before accumulation)
    if (acc.defined()) dst.copy_(optim::dense_grad(acc).reshape(-1)).add_(g.reshape(-1));
    else dst.copy_(g.reshape(-1));
    s.ready = s.has_grad = true;
    if (--b.pending == 0) {
      int before = next_launch;
      launch_ready();
      launched_early += next_launch - before;
    }
  }
};

GradSync::GradSync(Comm comm, optim::NamedTensors params, double bucket_mb) : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.comm = comm;
  if (comm.world_size() == 1) return;
  const int64_t cap = static_cast<int64_t>(bucket_mb * 1024 * 1024);
  // Reverse order: backward produces the last layers' gradients first.
  std::vector<int64_t> sizes;
  std::vector<at::TensorOptions> opts;
  for (int i = static_cast<int>(params.size()) - 1; i >= 0; --i) {
    const at::Tensor& p = params[i].second;
    if (!p.requires_grad()) continue;
    Impl::Slot slot;
    slot.param = p;
    slot.numel = p.numel();
    int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    bool fits = !s.buckets.empty() && sizes.back() + bytes <= cap && opts.back().dtype() == p.options().dtype() &&
                opts.back().device() == p.device();
    if (!fits) {
      s.buckets.emplace_back();
      sizes.push_back(0);
      opts.push_back(p.options().requires_grad(false));
    }
    slot.bucket = static_cast<int>(s.buckets.size()) - 1;
    slot.offset = sizes.back() / static_cast<int64_t>(p.element_size());
    sizes.back() += bytes;
    s.buckets.back().slots.push_back(static_cast<int>(s.slots.size()));
    s.slots.push_back(slot);
  }
  for (size_t b = 0; b < s.buckets.size(); ++b)
    s.buckets[b].flat = at::zeros({sizes[b] / static_cast<int64_t>(opts[b].dtype().itemsize())}, opts[b]);
  for (size_t i = 0; i < s.slots.size(); ++i) {
    Impl* self = impl_.get();
    int idx = static_cast<int>(i);
    s.slots[i].hook = s.slots[i].param.register_hook([self, idx](const at::Tensor& g) { self->on_grad(idx, g); });
  }
}

GradSync::~GradSync() {
  for (auto& s : impl_->slots) {
    try {
      s.param.remove_hook(s.hook);
    } catch (...) {
    }
  }
}

void GradSync::arm() {
  Impl& s = *impl_;
  if (s.comm.world_size() == 1) return;
  for (auto& b : s.buckets) b.pending = static_cast<int>(b.slots.size());
  for (auto& sl : s.slots) sl.ready = sl.has_grad = false;
  s.next_launch = 0;
  s.launched_early = 0;
  s.armed = true;
}

void GradSync::finish() {
  Impl& s = *impl_;
  if (s.comm.world_size() == 1) return;
  PTK_CHECK(s.armed, "GradSync::finish() without arm()");
  s.armed = false;
  torch::NoGradGuard ng;
  // Parameters this backward did not reach: their accumulated gradient, or zeros.
  for (auto& b : s.buckets) {
    if (b.pending == 0) continue;
    for (int i : b.slots) {
      auto& sl = s.slots[i];
      if (sl.ready) continue;
      at::Tensor dst = b.flat.narrow(0, sl.offset, sl.numel);
      if (sl.param.grad().defined()) {
        dst.copy_(optim::dense_grad(sl.param.grad()).reshape(-1));
        sl.has_grad = true;
      } else {
        dst.zero_();
      }
      sl.ready = true;
    }
    b.pending = 0;
  }
  s.launch_ready();
  // Which parameters had a gradient on any rank (one small collective, after the buckets).
  at::Tensor used = at::zeros({static_cast<int64_t>(s.slots.size())}, at::TensorOptions().dtype(at::kFloat));
  for (size_t i = 0; i < s.slots.size(); ++i) used[i] = s.slots[i].has_grad ? 1.0f : 0.0f;
  s.comm.all_reduce(used, ReduceOp::kMax);
  auto used_a = used.accessor<float, 1>();
  for (auto& b : s.buckets) b.work.wait();
  for (size_t i = 0; i < s.slots.size(); ++i) {
    auto& sl = s.slots[i];
    if (used_a[i] == 0) continue;
    at::Tensor src = s.buckets[sl.bucket].flat.narrow(0, sl.offset, sl.numel).view(sl.param.sizes());
    if (sl.param.grad().defined() && !sl.param.grad().is_sparse()) sl.param.mutable_grad().copy_(src);
    else sl.param.mutable_grad() = src.clone();
  }
}

int GradSync::num_buckets() const { return static_cast<int>(impl_->buckets.size()); }
int GradSync::launched_during_backward() const { return impl_->launched_early; }

}  // namespace ptk::parallel
