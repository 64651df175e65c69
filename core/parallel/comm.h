// ptk::parallel::Comm — the few collectives ptk needs (all-reduce, reduce-scatter, all-gather, broadcast, barrier) over a
// c10d process group (Gloo on CPU, NCCL on GPU builds), with rendezvous through c10d's TCPStore from
// torchrun's environment. Not a data-parallel trainer (core/train does that) nor a launcher (`ptk launch`).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace ptk::parallel {

enum class ReduceOp { kSum, kAvg, kMax, kMin };

struct CommOptions {
  // Every collective, and the rendezvous, fails with ptk::Error after this long (Gloo's own
  // default is 30 minutes: a dead peer would otherwise hang the run that long).
  double timeout_s = 300;
  // "auto" (NCCL when built with PTK_NCCL and the run's tensors are on CUDA, else Gloo), "gloo" or
  // "nccl". See choose_backend().
  std::string backend = "auto";
  // The run's tensors live on a CUDA device (run.device): what backend "auto" follows. A CPU run on a
  // machine with GPUs stays on Gloo (NCCL would copy every host tensor to the GPU and back).
  bool cuda = false;
  // Make the process group even at world size 1 (whose collectives are otherwise the identity, with no
  // group): what checks the NCCL path on a machine with one GPU (tests/parallel/comm_test).
  bool group_for_one_rank = false;
};

// The process-group backend for `requested` ("auto" | "gloo" | "nccl") when the collectives' tensors
// are CUDA tensors (`cuda`) or host tensors: auto = "nccl" for CUDA tensors on a build with NCCL
// (nccl_built()), else "gloo"; gloo and nccl as asked. Throws ptk::Error for another spelling.
std::string choose_backend(const std::string& requested, bool cuda);
// Whether this build has c10d's NCCL process group (PTK_NCCL=ON).
bool nccl_built();

// The environment torchrun (and `ptk launch`) gives each rank.
struct Env {
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};
// Reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Unset WORLD_SIZE
// means world size 1. Throws ptk::Error naming the variable when a value is malformed or missing.
Env env_from_environment();

// A handle on one process group; copies share it. The default-constructed Comm is world size 1:
// no process group, every collective is the identity (all_gather returns the input once).
// Threading: collectives must be issued in the same order on every rank, from one thread at a time
// (async work may be waited on from that thread later). Tensors stay owned by the caller; an async
// all-reduce's tensor must not be touched until its Work is waited on.
class Comm {
 public:
  Comm();
  ~Comm();
  Comm(const Comm&);
  Comm& operator=(const Comm&);

  // Rendezvous at env.master_addr:env.master_port (rank 0 hosts the TCPStore) and creates the
  // process group. World size 1 returns the default Comm without any networking (unless
  // options.group_for_one_rank).
  static Comm connect(const Env& env, const CommOptions& options = {});
  // connect(env_from_environment(), options): what a command run under torchrun / `ptk launch` calls.
  static Comm from_environment(const CommOptions& options = {});

  int rank() const;
  int world_size() const;
  int local_rank() const;
  bool is_main() const { return rank() == 0; }
  // "none" (world size 1), "gloo" or "nccl".
  std::string backend() const;
  double timeout_s() const;

  // An outstanding asynchronous collective; wait() throws ptk::Error if it failed or timed out.
  // NCCL: wait() makes the current CUDA stream wait for the collective and returns without blocking
  // the host (c10d's watchdog enforces the timeout there, ending the process with its error); Gloo:
  // it blocks until the collective is done or the timeout passes.
  class Work {
   public:
    Work();
    ~Work();
    Work(Work&&) noexcept;
    Work& operator=(Work&&) noexcept;
    void wait();
    bool pending() const;

   private:
    friend class Comm;
    struct Impl;
    std::unique_ptr<Impl> impl_;
  };

  // In place on `t` (any shape, contiguous). kAvg divides the sum by the world size (Gloo has no AVG).
  void all_reduce(const at::Tensor& t, ReduceOp op = ReduceOp::kSum);
  // Starts a sum all-reduce in place and returns at once (Gloo and NCCL run it on their own threads
  // or streams); used to overlap gradient buckets with backward.
  Work all_reduce_async(const at::Tensor& t);
  // Sum over ranks of `in` (contiguous, world_size() equal chunks of out.numel() elements along its
  // flattened order), this rank's chunk written to `out` (contiguous, in's dtype and device). NCCL:
  // c10d's native reduce-scatter. Gloo (whose c10d reduce-scatter is itself an all-reduce of a clone
  // plus a copy): an all-reduce of `in` in place, then this rank's chunk copied out; the same traffic as
  // an all-reduce and no clone. `in` is scratch: its contents are unspecified afterwards.
  void reduce_scatter(const at::Tensor& in, const at::Tensor& out);
  // The same, started and returned at once (overlapping backward); neither tensor may be touched
  // until the Work is waited on.
  Work reduce_scatter_async(const at::Tensor& in, const at::Tensor& out);
  // `out` must hold world_size() tensors shaped like `in` (views into one buffer are fine);
  // out[r] receives rank r's `in`.
  void all_gather(const at::Tensor& in, const std::vector<at::Tensor>& out);
  // Returns a (world_size, *in.shape) tensor: row r is rank r's `in`.
  at::Tensor all_gather(const at::Tensor& in);
  // In place: every rank's `t` becomes root's.
  void broadcast(const at::Tensor& t, int root = 0);
  void barrier();

  // Conveniences on host values (one small collective each).
  double all_reduce(double v, ReduceOp op);
  std::string broadcast(const std::string& s, int root = 0);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace ptk::parallel
