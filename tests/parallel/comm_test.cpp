// ptk::parallel::Comm on loopback: world size 1 without a process group, torchrun environment parsing,
// every collective with 2 Gloo ranks (each rank is this binary re-run as a child), reduce-scatter with
// 2 and 3, the choice of backend, and a peer that dies making the survivor fail with a clear error
// within the timeout instead of hanging.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdlib>
#include <thread>

#include "core/parallel/comm.h"
#include "core/parallel/grad_sync.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "tests/parallel/spawn.h"
#include "tests/support/test_util.h"

namespace ptk::parallel {
namespace {

std::string scenario() {
  const char* s = std::getenv("PTK_DIST_SCENARIO");
  return s ? s : "";
}

TEST(Comm, WorldSizeOneIsTheIdentity) {
  Comm c;
  EXPECT_EQ(c.world_size(), 1);
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.backend(), "none");
  auto t = torch::tensor({1.0f, 2.0f});
  c.all_reduce(t, ReduceOp::kAvg);
  EXPECT_TRUE(torch::equal(t, torch::tensor({1.0f, 2.0f})));
  auto g = c.all_gather(t);
  EXPECT_EQ(g.sizes(), (std::vector<int64_t>{1, 2}));
  EXPECT_TRUE(torch::equal(g[0], t));
  c.all_reduce_async(t).wait();
  c.broadcast(t);
  c.barrier();
  EXPECT_EQ(c.all_reduce(3.5, ReduceOp::kSum), 3.5);
  EXPECT_EQ(c.broadcast(std::string("abc")), "abc");
}

// A process group of one rank runs every collective through c10d: Gloo here, NCCL on a GPU machine
// (the one way a single GPU checks ptk's NCCL calls: scripts/gpu_check.sh runs this binary).
void collectives_of_one_rank(const std::string& backend, const at::Device& dev) {
  Env env;
  env.master_port = test::free_port();
  CommOptions o;
  o.backend = backend;
  o.cuda = dev.is_cuda();
  o.group_for_one_rank = true;
  o.timeout_s = 60;
  Comm c = Comm::connect(env, o);
  EXPECT_EQ(c.backend(), backend);
  EXPECT_EQ(c.world_size(), 1);
  const auto f = torch::TensorOptions().dtype(torch::kFloat).device(dev);
  auto t = torch::arange(6, f);
  c.all_reduce(t, ReduceOp::kSum);
  EXPECT_TRUE(torch::equal(t.cpu(), torch::arange(6, torch::kFloat)));
  c.all_reduce(t, ReduceOp::kMax);
  c.all_reduce_async(t).wait();
  EXPECT_TRUE(torch::equal(t.cpu(), torch::arange(6, torch::kFloat)));
  auto out = torch::zeros({6}, f);
  c.reduce_scatter(t, out);
  EXPECT_TRUE(torch::equal(out.cpu(), torch::arange(6, torch::kFloat)));
  auto out2 = torch::zeros({6}, f);
  c.reduce_scatter_async(t, out2).wait();
  EXPECT_TRUE(torch::equal(out2.cpu(), torch::arange(6, torch::kFloat)));
  auto g = c.all_gather(t);
  EXPECT_EQ(g.sizes(), (std::vector<int64_t>{1, 6}));
  EXPECT_TRUE(torch::equal(g[0].cpu(), t.cpu()));
  c.broadcast(t);
  c.barrier();
  EXPECT_EQ(c.all_reduce(2.5, ReduceOp::kSum), 2.5);
  EXPECT_EQ(c.broadcast(std::string("xyz")), "xyz");
  // Host tensors on an NCCL group travel through the device and come back.
  auto h = torch::tensor({1.0, 2.0}, torch::kDouble);
  c.all_reduce(h, ReduceOp::kSum);
  EXPECT_TRUE(torch::equal(h, torch::tensor({1.0, 2.0}, torch::kDouble)));
}

TEST(Comm, GlooGroupOfOneRank) { collectives_of_one_rank("gloo", at::Device(at::kCPU)); }

TEST(Comm, NcclGroupOfOneRankOnTheGpu) {
  if (!nccl_built()) GTEST_SKIP() << "this build has no NCCL process group";
  if (!torch::cuda::is_available()) PTK_SKIP_WITHOUT("gpu") << "no usable CUDA GPU on this machine";
  collectives_of_one_rank("nccl", at::Device(at::kCUDA, 0));
}

TEST(Comm, EnvironmentParsing) {
  auto set = [](const char* k, const char* v) {
    if (v) setenv(k, v, 1);
    else unsetenv(k);
  };
  for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})
    set(k, nullptr);
  Env e = env_from_environment();
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.rank, 0);
  set("WORLD_SIZE", "2");
  try {
    env_from_environment();
    ADD_FAILURE() << "WORLD_SIZE=2 without RANK was accepted";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("RANK is not set"), std::string::npos) << err.what();
  }
  set("RANK", "1");
  set("MASTER_ADDR", "10.0.0.1");
  set("MASTER_PORT", "x12");
  EXPECT_THROW(env_from_environment(), Error);
  set("MASTER_PORT", "1234");
  e = env_from_environment();
  EXPECT_EQ(e.rank, 1);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.master_addr, "10.0.0.1");
  EXPECT_EQ(e.master_port, 1234);
  set("RANK", "2");
  EXPECT_THROW(env_from_environment(), Error);
  for (const char* k : {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) set(k, nullptr);
}

// The rank body: run by the children of the tests below.
TEST(DistWorker, Main) {
  at::set_num_threads(1);
  CommOptions o;
  o.timeout_s = std::atof(std::getenv("PTK_DIST_TIMEOUT"));
  Comm c = Comm::from_environment(o);
  const int r = c.rank(), w = c.world_size();
  ASSERT_EQ(w, 2);
  if (scenario() == "collectives") {
    EXPECT_EQ(c.backend(), "gloo");
    auto t = torch::tensor({1.0f * (r + 1), 2.0f * (r + 1)});
    c.all_reduce(t, ReduceOp::kSum);
    EXPECT_TRUE(torch::equal(t, torch::tensor({3.0f, 6.0f}))) << t;
    t = torch::tensor({1.0f * (r + 1), 2.0f * (r + 1)});
    c.all_reduce(t, ReduceOp::kAvg);
    EXPECT_TRUE(torch::equal(t, torch::tensor({1.5f, 3.0f}))) << t;
    auto i = torch::tensor({int64_t(r * 10), int64_t(-r)});
    c.all_reduce(i, ReduceOp::kMax);
    EXPECT_TRUE(torch::equal(i, torch::tensor({int64_t(10), int64_t(0)}))) << i;
    i = torch::tensor({int64_t(r * 10), int64_t(-r)});
    c.all_reduce(i, ReduceOp::kMin);
    EXPECT_TRUE(torch::equal(i, torch::tensor({int64_t(0), int64_t(-1)}))) << i;
    EXPECT_EQ(c.all_reduce(0.25 + r, ReduceOp::kSum), 1.5);
    // all_gather into views of one flat buffer (what ZeRO-1 does).
    auto flat = torch::zeros({6});
    c.all_gather(torch::full({3}, float(r + 7)), {flat.narrow(0, 0, 3), flat.narrow(0, 3, 3)});
    EXPECT_TRUE(torch::equal(flat, torch::tensor({7.f, 7.f, 7.f, 8.f, 8.f, 8.f}))) << flat;
    auto g = c.all_gather(torch::full({2, 2}, double(r)));
    EXPECT_EQ(g.sizes(), (std::vector<int64_t>{2, 2, 2}));
    EXPECT_EQ(g[1][1][1].item<double>(), 1.0);
    auto b = torch::full({4}, float(r));
    c.broadcast(b, 1);
    EXPECT_TRUE(torch::equal(b, torch::ones({4})));
    EXPECT_EQ(c.broadcast(r == 0 ? std::string("from rank 0 \xe2\x9c\x93") : std::string(), 0),
              "from rank 0 \xe2\x9c\x93");
    // Several async all-reduces in flight at once, waited in order (gradient buckets).
    std::vector<at::Tensor> bufs;
    std::vector<Comm::Work> works;
    for (int k = 0; k < 4; ++k) {
      bufs.push_back(torch::full({250000}, float(k + r)));
      works.push_back(c.all_reduce_async(bufs.back()));
    }
    for (auto& wk : works) wk.wait();
    for (int k = 0; k < 4; ++k) EXPECT_EQ(bufs[k][12345].item<float>(), float(2 * k + 1));
    c.barrier();
  } else if (scenario() == "peer_dies") {
    c.barrier();
    if (r == 1) std::_Exit(3);  // dies without a goodbye
    auto t0 = std::chrono::steady_clock::now();
    auto t = torch::ones({1000});
    try {
      for (int k = 0; k < 1000; ++k) c.all_reduce(t, ReduceOp::kSum);
      ADD_FAILURE() << "all_reduce with a dead peer did not fail";
    } catch (const Error& e) {
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("survivor error after %.2f s: %s\n", s, e.what());
      EXPECT_NE(std::string(e.what()).find("all_reduce failed on rank 0 of 2"), std::string::npos) << e.what();
      EXPECT_LE(s, o.timeout_s + 5);
    }
  } else if (scenario() == "grad_sync") {
    // Two micro-batches (the first accumulates locally), then the synced one; compared with summing
    // each rank's accumulated gradient by plain all-reduce. `partial` is used by rank 0 only,
    // `unused` by nobody.
    auto make = [] {
      torch::manual_seed(0);
      optim::NamedTensors p;
      p.emplace_back("unused", torch::zeros({4}).requires_grad_());
      p.emplace_back("partial", torch::ones({3}).requires_grad_());
      for (const char* n : {"w1", "w2", "w3"}) p.emplace_back(n, (torch::randn({64, 64}) * 0.1).requires_grad_());
      return p;
    };
    auto loss = [&](const optim::NamedTensors& p, int mb) {
      auto x = torch::full({8, 64}, 0.1 * (r + 1) + 0.05 * mb);
      auto y = torch::tanh(torch::tanh(x.mm(p[2].second)).mm(p[3].second)).mm(p[4].second).sum();
      if (r == 0) y = y + 2 * p[1].second.sum();
      return y;
    };
    auto ref = make();
    for (int mb = 0; mb < 2; ++mb) loss(ref, mb).backward();
    for (int i = 1; i < 5; ++i) {  // the same collectives on both ranks: rank 1 has no grad for `partial`
      auto& t = ref[i].second;
      if (!t.grad().defined()) t.mutable_grad() = torch::zeros_like(t);
      c.all_reduce(t.mutable_grad(), ReduceOp::kSum);
    }
    auto ps = make();
    GradSync sync(c, ps, 0.016);  // 16 KiB buckets: w3 | w2 | w1 + partial + unused
    EXPECT_EQ(sync.num_buckets(), 3);
    loss(ps, 0).backward();
    sync.arm();
    loss(ps, 1).backward();
    sync.finish();
    EXPECT_EQ(sync.launched_during_backward(), 2) << "buckets of w3 and w2 start before backward ends";
    for (int i = 1; i < 5; ++i)
      EXPECT_TRUE(torch::equal(ps[i].second.grad(), ref[i].second.grad())) << ps[i].first;
    EXPECT_TRUE(torch::equal(ps[1].second.grad(), torch::full({3}, 4.0f))) << ps[1].second.grad();
    EXPECT_FALSE(ps[0].second.grad().defined()) << "a parameter no rank used got a gradient";
  } else if (scenario() == "peer_hangs") {
    c.barrier();
    if (r == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(10));  // alive, but never joins
      std::_Exit(4);
    }
    auto t0 = std::chrono::steady_clock::now();
    auto t = torch::ones({10});
    try {
      c.all_reduce(t, ReduceOp::kSum);
      ADD_FAILURE() << "all_reduce with a silent peer did not time out";
    } catch (const Error& e) {
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("survivor error after %.2f s: %s\n", s, e.what());
      EXPECT_GE(s, o.timeout_s - 0.5);
      EXPECT_LE(s, o.timeout_s + 5);
    }
    std::fflush(stdout);
    std::_Exit(::testing::Test::HasFailure() ? 1 : 0);  // do not wait for the sleeping peer at teardown
  } else {
    FAIL() << "unknown scenario " << scenario();
  }
}

std::vector<int> run_ranks(const std::string& name, double timeout, test::TempDir& d, std::vector<std::string>* logs) {
  int port = test::free_port();
  std::vector<test::Child> kids;
  for (int r = 0; r < 2; ++r) {
    auto env = test::rank_env(r, 2, port);
    env.push_back("PTK_DIST_SCENARIO=" + name);
    env.push_back("PTK_DIST_TIMEOUT=" + std::to_string(timeout));
    kids.push_back(test::spawn_worker("DistWorker.Main", env, d.file(name + "-rank" + std::to_string(r) + ".log")));
  }
  std::vector<int> codes;
  for (auto& k : kids) codes.push_back(test::wait_child(k, timeout + 60));
  for (int r = 0; r < 2; ++r) logs->push_back(read_file(d.file(name + "-rank" + std::to_string(r) + ".log")));
  return codes;
}

// Reduce-scatter on any number of ranks (children of Comm.ReduceScatterWith*GlooRanks): each rank's
// input is a known function of its rank, so the summed chunk is known exactly (small integers in
// float32 and float64 add without rounding).
TEST(DistWorker, ReduceScatter) {
  at::set_num_threads(1);
  CommOptions o;
  o.timeout_s = std::atof(std::getenv("PTK_DIST_TIMEOUT"));
  Comm c = Comm::from_environment(o);
  const int r = c.rank(), w = c.world_size();
  ASSERT_EQ(w, std::atoi(std::getenv("PTK_DIST_WORLD")));
  ASSERT_EQ(c.backend(), "gloo");
  const double tri = w * (w + 1) / 2.0;  // sum over ranks q of (q + 1)
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const int64_t n = 7;
    auto in = torch::arange(w * n, torch::TensorOptions().dtype(dtype)) * (r + 1);
    auto out = torch::full({n}, -1.0, torch::TensorOptions().dtype(dtype));
    c.reduce_scatter(in, out);
    auto expect = torch::arange(r * n, (r + 1) * n, torch::TensorOptions().dtype(dtype)) * tri;
    EXPECT_TRUE(torch::equal(out, expect)) << "rank " << r << ": " << out << " vs " << expect;
  }
  // Several in flight at once, waited in order (ZeRO-2's buckets), into views of one shard buffer.
  const int64_t sizes[3] = {1, 1000, 33};
  auto shard = torch::zeros({1 + 1000 + 33});
  std::vector<at::Tensor> ins;
  std::vector<Comm::Work> works;
  int64_t at = 0;
  for (int k = 0; k < 3; ++k) {
    ins.push_back(torch::full({w * sizes[k]}, float(k + 1)) + torch::arange(w * sizes[k]).to(torch::kFloat) * r);
    works.push_back(c.reduce_scatter_async(ins.back(), shard.narrow(0, at, sizes[k])));
    at += sizes[k];
  }
  for (auto& wk : works) wk.wait();
  at = 0;
  for (int k = 0; k < 3; ++k) {
    // sum_q (k + 1 + i * q) for global index i = r * size + j: w (k + 1) + i w (w - 1) / 2
    auto i = torch::arange(r * sizes[k], (r + 1) * sizes[k]).to(torch::kFloat);
    auto expect = float(w * (k + 1)) + i * float(w * (w - 1) / 2);
    EXPECT_TRUE(torch::equal(shard.narrow(0, at, sizes[k]), expect)) << "bucket " << k << " rank " << r;
    at += sizes[k];
  }
  // A size that does not split into world-size chunks is refused before anything is sent.
  EXPECT_THROW(c.reduce_scatter(torch::zeros({w * 3 + 1}), torch::zeros({3})), Error);
  c.barrier();
}

std::vector<int> run_world(const std::string& filter, int world, double timeout, test::TempDir& d,
                           std::vector<std::string>* logs) {
  int port = test::free_port();
  std::vector<test::Child> kids;
  for (int r = 0; r < world; ++r) {
    auto env = test::rank_env(r, world, port);
    env.push_back("PTK_DIST_TIMEOUT=" + std::to_string(timeout));
    env.push_back("PTK_DIST_WORLD=" + std::to_string(world));
    kids.push_back(test::spawn_worker(filter, env, d.file("rank" + std::to_string(r) + ".log")));
  }
  std::vector<int> codes;
  for (auto& k : kids) codes.push_back(test::wait_child(k, timeout + 60));
  for (int r = 0; r < world; ++r) logs->push_back(read_file(d.file("rank" + std::to_string(r) + ".log")));
  return codes;
}

TEST(Comm, ReduceScatterWithTwoAndThreeGlooRanks) {
  for (int world : {2, 3}) {
    test::TempDir d;
    std::vector<std::string> logs;
    auto codes = run_world("DistWorker.ReduceScatter", world, 60, d, &logs);
    for (int r = 0; r < world; ++r) EXPECT_EQ(codes[r], 0) << world << " ranks, rank " << r << " log:\n" << logs[r];
  }
}

TEST(Comm, ReduceScatterOfOneRankIsACopy) {
  Comm c;
  auto in = torch::tensor({1.0f, 2.0f, 3.0f}), out = torch::zeros({3});
  c.reduce_scatter(in, out);
  EXPECT_TRUE(torch::equal(out, in));
  out.zero_();
  c.reduce_scatter_async(in, out).wait();
  EXPECT_TRUE(torch::equal(out, in));
}

// dist.backend=auto follows where the run's tensors are (run.device), not whether a GPU exists: a CPU
// run on a GPU machine stays on Gloo (NCCL would stage every host tensor through the GPU).
TEST(Comm, AutoBackendFollowsTheRunsDevice) {
  EXPECT_EQ(choose_backend("auto", /*cuda=*/false), "gloo");
  EXPECT_EQ(choose_backend("auto", /*cuda=*/true), nccl_built() ? "nccl" : "gloo");
  EXPECT_EQ(choose_backend("gloo", true), "gloo");
  EXPECT_EQ(choose_backend("nccl", false), "nccl");  // asked for by name: as asked
  try {
    choose_backend("mpi", false);
    ADD_FAILURE() << "backend mpi accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use auto, gloo or nccl"), std::string::npos) << e.what();
  }
}

TEST(Comm, CollectivesWithTwoGlooRanks) {
  test::TempDir d;
  std::vector<std::string> logs;
  auto codes = run_ranks("collectives", 60, d, &logs);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r << " log:\n" << logs[r];
}

TEST(GradSync, BucketsOverlapBackwardAndSumLikeAllReduce) {
  test::TempDir d;
  std::vector<std::string> logs;
  auto codes = run_ranks("grad_sync", 60, d, &logs);
  for (int r = 0; r < 2; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r << " log:\n" << logs[r];
}

TEST(Comm, DeadPeerFailsTheSurvivorWithinTheTimeout) {
  test::TempDir d;
  std::vector<std::string> logs;
  auto t0 = std::chrono::steady_clock::now();
  auto codes = run_ranks("peer_dies", 10, d, &logs);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(codes[1], 3) << logs[1];
  EXPECT_EQ(codes[0], 0) << "rank 0 log:\n" << logs[0];  // its expectations passed: it failed cleanly
  EXPECT_NE(logs[0].find("survivor error"), std::string::npos) << logs[0];
  EXPECT_LT(s, 40) << "took " << s << " s";
  std::printf("%s", logs[0].substr(logs[0].find("survivor error")).substr(0, 400).c_str());
}

// A peer that is alive but never joins the collective: the explicit timeout (not Gloo's 30 minutes).
TEST(Comm, SilentPeerTimesOut) {
  test::TempDir d;
  std::vector<std::string> logs;
  auto codes = run_ranks("peer_hangs", 4, d, &logs);
  EXPECT_EQ(codes[0], 0) << "rank 0 log:\n" << logs[0];
  EXPECT_EQ(codes[1], 4) << logs[1];
  EXPECT_NE(logs[0].find("survivor error"), std::string::npos) << logs[0];
}

}  // namespace
}  // namespace ptk::parallel
