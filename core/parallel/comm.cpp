// Comm over c10d: TCPStore rendezvous and a Gloo (or NCCL) process group, used as a c10d::Backend
// directly (no ProcessGroup wrapper: one backend per Comm). Gloo has no AVG: AVG is a sum, then a
// division; its reduce-scatter is emulated here by an in-place all-reduce (see Comm::reduce_scatter).
#include "core/parallel/comm.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "core/runtime/device.h"
#include "core/util/error.h"

#if PTK_HAVE_C10D
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#if PTK_HAVE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if PTK_HAVE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif

namespace ptk::parallel {

#if PTK_HAVE_C10D
using Group = c10d::Backend;  // Gloo's and NCCL's process groups are backends
#endif

namespace {

int env_int(const char* name, int fallback, bool required) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    if (required)
      throw Error(std::string("distributed run: ") + name + " is not set although WORLD_SIZE > 1\n"
                  "---> HINT: start ranks with `ptk launch -n N -- ...` or torchrun, which set RANK, WORLD_SIZE, "
                  "LOCAL_RANK, MASTER_ADDR and MASTER_PORT");
    return fallback;
  }
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0 || x > 1 << 30)
    throw Error(std::string("distributed run: ") + name + "=" + v + " is not a non-negative integer");
  return static_cast<int>(x);
}

#if PTK_HAVE_C10D
c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:  // Gloo has no AVG: sum, then divide
      return c10d::ReduceOp::SUM;
    case ReduceOp::kMax:
      return c10d::ReduceOp::MAX;
    case ReduceOp::kMin:
      return c10d::ReduceOp::MIN;
  }
  return c10d::ReduceOp::SUM;
}

std::string seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}
#endif

}  // namespace

Env env_from_environment() {
  Env e;
  e.world_size = env_int("WORLD_SIZE", 1, false);
  if (e.world_size == 0) throw Error("distributed run: WORLD_SIZE=0; it must be at least 1");
  bool multi = e.world_size > 1;
  e.rank = env_int("RANK", 0, multi);
  e.local_rank = runtime::env_local_rank();  // LOCAL_RANK, else RANK: the GPU run.device=auto takes
  e.local_world_size = env_int("LOCAL_WORLD_SIZE", e.world_size, false);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  else if (multi) env_int("MASTER_ADDR", 0, true);  // throws the "not set" message
  e.master_port = env_int("MASTER_PORT", 29500, multi);
  if (e.rank >= e.world_size)
    throw Error("distributed run: RANK=" + std::to_string(e.rank) + " but WORLD_SIZE=" + std::to_string(e.world_size) +
                "; RANK must be below WORLD_SIZE");
  if (e.master_port <= 0 || e.master_port > 65535)
    throw Error("distributed run: MASTER_PORT=" + std::to_string(e.master_port) + " is not a TCP port");
  return e;
}

bool nccl_built() {
#if PTK_HAVE_C10D_NCCL
  return true;
#else
  return false;
#endif
}

std::string choose_backend(const std::string& requested, bool cuda) {
  if (requested == "auto") return cuda && nccl_built() ? "nccl" : "gloo";
  if (requested != "gloo" && requested != "nccl")
    throw Error("dist: backend `" + requested + "` is unknown; use auto, gloo or nccl");
  return requested;
}

struct Comm::Impl {
  Env env;
  CommOptions opt;
  std::string backend = "none";
#if PTK_HAVE_C10D
  c10::intrusive_ptr<c10d::Store> store;  // declared first: destroyed after the group
  c10::intrusive_ptr<Group> group;
#endif
  bool nccl = false;

  // No process group: world size 1 (without CommOptions::group_for_one_rank); collectives are the identity.
  bool solo() const {
#if PTK_HAVE_C10D
    return !group;
#else
    return true;
#endif
  }

  std::chrono::milliseconds timeout() const {
    return std::chrono::milliseconds(static_cast<int64_t>(opt.timeout_s * 1000));
  }
  [[noreturn]] void fail(const char* what, const std::exception& e) const {
    throw Error(std::string("dist: ") + what + " failed on rank " + std::to_string(env.rank) + " of " +
                std::to_string(env.world_size) + " (" + backend + ", timeout " + seconds(opt.timeout_s) + " s): " +
                e.what() +
                "\n---> HINT: another rank probably exited or stopped answering; its own output says why. "
                "If ranks legitimately wait longer (rank 0 writing a large checkpoint), raise the timeout "
                "(dist.timeout_s).");
  }
  // NCCL works on CUDA tensors only: host tensors travel through a device copy.
  at::Tensor on_device(const at::Tensor& t) const {
    if (nccl && !t.is_cuda()) return t.to(at::Device(at::kCUDA, env.local_rank));
    return t;
  }
};

struct Comm::Work::Impl {
#if PTK_HAVE_C10D
  c10::intrusive_ptr<c10d::Work> work;
#endif
  // After the collective: the result put in place (a staged device copy copied back to the host
  // tensor, Gloo's reduce-scatter chunk copied out). Holds the tensors it needs.
  std::function<void()> then;
  const char* what = "all_reduce";
  std::shared_ptr<Comm::Impl> comm;
};

Comm::Work::Work() = default;
Comm::Work::~Work() {
  // An abandoned collective still writes into its tensor: finish it (errors were the caller's to see).
  if (pending()) {
    try {
      wait();
    } catch (...) {
    }
  }
}
Comm::Work::Work(Work&&) noexcept = default;
Comm::Work& Comm::Work::operator=(Work&&) noexcept = default;
bool Comm::Work::pending() const {
#if PTK_HAVE_C10D
  return impl_ && impl_->work;
#else
  return false;
#endif
}
void Comm::Work::wait() {
#if PTK_HAVE_C10D
  if (!pending()) return;
  auto w = std::move(impl_->work);
  auto then = std::move(impl_->then);
  impl_->then = nullptr;
  try {
    // NCCL with a timeout would block the host until the collective is done (WorkNCCL::wait); without
    // one (c10d's global kNoTimeout) it only orders the current stream after it, and the watchdog enforces
    // options.timeout.
    w->wait(impl_->comm->nccl ? ::kNoTimeout : impl_->comm->timeout());
  } catch (const std::exception& e) {
    impl_->comm->fail(impl_->what, e);
  }
  if (then) then();
#endif
}

Comm::Comm() : impl_(std::make_shared<Impl>()) {}
Comm::~Comm() = default;
Comm::Comm(const Comm&) = default;
Comm& Comm::operator=(const Comm&) = default;

Comm Comm::from_environment(const CommOptions& options) { return connect(env_from_environment(), options); }

Comm Comm::connect(const Env& env, const CommOptions& options) {
  Comm c;
  c.impl_->env = env;
  c.impl_->opt = options;
  if (env.world_size <= 1 && !options.group_for_one_rank) return c;
  PTK_CHECK(options.timeout_s > 0, "dist: timeout_s must be positive");
#if !PTK_HAVE_C10D
  throw Error("WORLD_SIZE=" + std::to_string(env.world_size) +
              " but this ptk was built without c10d process groups\n"
              "---> HINT: install libgloo-dev (Debian) and reconfigure, or run with one rank");
#else
  Impl& s = *c.impl_;
  const std::string backend = choose_backend(options.backend, options.cuda);
  s.backend = backend;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = s.timeout();
    s.store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    throw Error("dist: rendezvous at " + env.master_addr + ":" + std::to_string(env.master_port) + " failed on rank " +
                std::to_string(env.rank) + " of " + std::to_string(env.world_size) + ": " + e.what() +
                "\n---> HINT: every rank must reach MASTER_ADDR:MASTER_PORT within the timeout (" +
                seconds(options.timeout_s) + " s) and the port must be free on rank 0's machine");
  }
  try {
    if (backend == "gloo") {
#if PTK_HAVE_C10D_GLOO
      auto o = c10d::ProcessGroupGloo::Options::create(s.timeout());
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      else if (is_loopback(env.master_addr))
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      else
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      o->threads = 2;
      s.group = c10::make_intrusive<c10d::ProcessGroupGloo>(s.store, env.rank, env.world_size, o);
#else
      throw Error("this ptk was built without Gloo (libgloo-dev headers were not found at configure time)");
#endif
    } else {
#if PTK_HAVE_C10D_NCCL
      // Unchecked path (needs a CUDA build of LibTorch 2.x with PTK_NCCL=ON).
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = s.timeout();
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(env.local_rank));
      s.group = c10::make_intrusive<c10d::ProcessGroupNCCL>(s.store, env.rank, env.world_size, o);
      s.nccl = true;
#else
      throw Error("dist: backend nccl requested but this ptk was built without PTK_NCCL");
#endif
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    s.fail("creating the process group", e);
  }
  c.barrier();  // every rank has its group before anyone sends
  return c;
#endif
}

int Comm::rank() const { return impl_->env.rank; }
int Comm::world_size() const { return impl_->env.world_size; }
int Comm::local_rank() const { return impl_->env.local_rank; }
std::string Comm::backend() const { return impl_->backend; }
double Comm::timeout_s() const { return impl_->opt.timeout_s; }

void Comm::all_reduce(const at::Tensor& t, ReduceOp op) {
  if (impl_->solo()) return;
#if PTK_HAVE_C10D
  PTK_CHECK(t.is_contiguous(), "dist: all_reduce needs a contiguous tensor");
  at::Tensor d = impl_->on_device(t);
  std::vector<at::Tensor> ts{d};
  c10d::AllreduceOptions o;
  o.reduceOp = to_c10d(op);
  o.timeout = impl_->timeout();
  try {
    impl_->group->allreduce(ts, o)->wait(impl_->timeout());
  } catch (const std::exception& e) {
    impl_->fail("all_reduce", e);
  }
  if (!d.is_same(t)) t.copy_(d);
  if (op == ReduceOp::kAvg) {
    if (at::isIntegralType(t.scalar_type(), false)) t.div_(world_size(), "floor");
    else t.div_(world_size());
  }
#endif
}

Comm::Work Comm::all_reduce_async(const at::Tensor& t) {
  Work w;
  if (impl_->solo()) return w;
#if PTK_HAVE_C10D
  PTK_CHECK(t.is_contiguous(), "dist: all_reduce_async needs a contiguous tensor");
  w.impl_ = std::make_unique<Work::Impl>();
  w.impl_->comm = impl_;
  at::Tensor d = impl_->on_device(t);
  if (!d.is_same(t)) w.impl_->then = [t, d] { t.copy_(d); };
  std::vector<at::Tensor> ts{d};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  o.timeout = impl_->timeout();
  try {
    w.impl_->work = impl_->group->allreduce(ts, o);
  } catch (const std::exception& e) {
    impl_->fail("all_reduce", e);
  }
#endif
  return w;
}

Comm::Work Comm::reduce_scatter_async(const at::Tensor& in, const at::Tensor& out) {
  PTK_CHECK(in.is_contiguous() && out.is_contiguous(), "dist: reduce_scatter needs contiguous tensors");
  PTK_CHECK(in.numel() == out.numel() * world_size(),
            "dist: reduce_scatter's input has " + std::to_string(in.numel()) + " elements, not world size " +
                std::to_string(world_size()) + " x the output's " + std::to_string(out.numel()));
  PTK_CHECK(in.scalar_type() == out.scalar_type() && in.device() == out.device(),
            "dist: reduce_scatter's input and output differ in dtype or device");
  Work w;
  if (impl_->solo()) {
    if (!out.is_same(in)) out.view(-1).copy_(in.view(-1));
    return w;
  }
#if PTK_HAVE_C10D
  w.impl_ = std::make_unique<Work::Impl>();
  w.impl_->comm = impl_;
  w.impl_->what = "reduce_scatter";
  const int64_t n = out.numel();
  try {
    if (impl_->nccl) {
      at::Tensor d_in = impl_->on_device(in).view(-1);
      at::Tensor d_out = out.is_cuda() ? out.view(-1) : at::empty({n}, d_in.options());
      c10d::ReduceScatterOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      o.timeout = impl_->timeout();
      w.impl_->work = impl_->group->_reduce_scatter_base(d_out, d_in, o);
      if (!out.is_cuda()) w.impl_->then = [out, d_out, d_in] { out.view(-1).copy_(d_out); };
    } else {
      // Gloo: sum everything in place, keep this rank's chunk.
      std::vector<at::Tensor> ts{in.view(-1)};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      o.timeout = impl_->timeout();
      w.impl_->work = impl_->group->allreduce(ts, o);
      const int64_t at = static_cast<int64_t>(rank()) * n;
      w.impl_->then = [in, out, at, n] { out.view(-1).copy_(in.view(-1).narrow(0, at, n)); };
    }
  } catch (const std::exception& e) {
    impl_->fail("reduce_scatter", e);
  }
#endif
  return w;
}

void Comm::reduce_scatter(const at::Tensor& in, const at::Tensor& out) { reduce_scatter_async(in, out).wait(); }

void Comm::all_gather(const at::Tensor& in, const std::vector<at::Tensor>& out) {
  PTK_CHECK(static_cast<int>(out.size()) == world_size(), "dist: all_gather needs one output tensor per rank");
  for (auto& o : out)
    PTK_CHECK(o.sizes() == in.sizes() && o.scalar_type() == in.scalar_type(),
              "dist: all_gather outputs must match the input's shape and dtype");
  if (impl_->solo()) {
    if (!out[0].is_same(in)) out[0].copy_(in);
    return;
  }
#if PTK_HAVE_C10D
  std::vector<at::Tensor> ins{impl_->on_device(in.contiguous())};
  std::vector<std::vector<at::Tensor>> outs(1);
  for (auto& o : out) outs[0].push_back(impl_->nccl && !o.is_cuda() ? at::empty_like(ins[0]) : o);
  c10d::AllgatherOptions opt;
  opt.timeout = impl_->timeout();
  try {
    impl_->group->allgather(outs, ins, opt)->wait(impl_->timeout());
  } catch (const std::exception& e) {
    impl_->fail("all_gather", e);
  }
  for (size_t r = 0; r < out.size(); ++r)
    if (!outs[0][r].is_same(out[r])) out[r].copy_(outs[0][r]);
#endif
}

at::Tensor Comm::all_gather(const at::Tensor& in) {
  std::vector<int64_t> shape{world_size()};
  for (auto s : in.sizes()) shape.push_back(s);
  at::Tensor out = at::empty(shape, in.options());
  std::vector<at::Tensor> rows;
  for (int r = 0; r < world_size(); ++r) rows.push_back(out[r]);
  all_gather(in, rows);
  return out;
}

void Comm::broadcast(const at::Tensor& t, int root) {
  PTK_CHECK(root >= 0 && root < world_size(), "dist: broadcast root out of range");
  if (impl_->solo()) return;
#if PTK_HAVE_C10D
  PTK_CHECK(t.is_contiguous(), "dist: broadcast needs a contiguous tensor");
  at::Tensor d = impl_->on_device(t);
  std::vector<at::Tensor> ts{d};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  o.timeout = impl_->timeout();
  try {
    impl_->group->broadcast(ts, o)->wait(impl_->timeout());
  } catch (const std::exception& e) {
    impl_->fail("broadcast", e);
  }
  if (!d.is_same(t)) t.copy_(d);
#endif
}

void Comm::barrier() {
  if (impl_->solo()) return;
#if PTK_HAVE_C10D
  c10d::BarrierOptions o;
  o.timeout = impl_->timeout();
  try {
    impl_->group->barrier(o)->wait(impl_->timeout());
  } catch (const std::exception& e) {
    impl_->fail("barrier", e);
  }
#endif
}

double Comm::all_reduce(double v, ReduceOp op) {
  if (impl_->solo()) return v;
  at::Tensor t = at::full({1}, v, at::TensorOptions().dtype(at::kDouble));
  all_reduce(t, op);
  return t.item<double>();
}

std::string Comm::broadcast(const std::string& s, int root) {
  if (impl_->solo()) return s;
  at::Tensor n = at::full({1}, static_cast<int64_t>(s.size()), at::TensorOptions().dtype(at::kLong));
  broadcast(n, root);
  int64_t len = n.item<int64_t>();
  at::Tensor bytes = at::zeros({std::max<int64_t>(len, 1)}, at::TensorOptions().dtype(at::kByte));
  if (rank() == root) std::memcpy(bytes.data_ptr<uint8_t>(), s.data(), s.size());
  broadcast(bytes, root);
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(len));
}

}  // namespace ptk::parallel
