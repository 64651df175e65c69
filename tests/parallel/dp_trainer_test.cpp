// Data-parallel training on loopback Gloo ranks (children re-running this binary): 2 ranks with
// micro-batch b end with the parameters of 1 rank with micro-batch 2b, and of 1 rank with twice the
// gradient accumulation (plain, ZeRO-1 and ZeRO-2, which agree with each other), resume works after
// both ranks are killed, a ZeRO-1 or ZeRO-2 checkpoint refuses another world size or sharding, and a
// rank that dies (also inside ZeRO-2's reduce-scatters) makes the other exit with a clear error within
// the timeout.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <sstream>

#include "core/checkpoint/checkpoint.h"
#include "core/parallel/comm.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/parallel/spawn.h"
#include "tests/support/tiny_lm_stage.h"
#include "tests/support/test_util.h"

namespace ptk::train {
namespace {

constexpr int64_t kDocs = 32, kSeed = 3;

const char* env(const char* k) {
  const char* v = std::getenv(k);
  return v ? v : "";
}

// `sharding`: none | zero1 (spelled TrainerOptions::zero1, as recipes with train.zero1 do) | zero2.
TrainerOptions options(const std::string& dir, const std::string& sharding, int64_t checkpoint_every,
                       int64_t grad_accum = 2) {
  TrainerOptions o;
  o.run_dir = dir;
  o.resolved_recipe = "{}\n";
  o.lr = 3e-3;
  o.schedule = "cosine";
  o.warmup_steps = 2;
  o.adamw = optim::AdamWOptions{0.9, 0.95, 1e-8, 0.01, false};
  o.peak_flops = 1e10;
  o.label = "dp";
  o.epochs = 2;
  o.grad_accum = grad_accum;  // 2: exercises local accumulation before the synced micro-batch
  o.zero1 = sharding == "zero1";
  if (sharding == "zero2") o.sharding = "zero2";
  o.checkpoint_every = checkpoint_every;
  o.bucket_mb = 0.01;  // several buckets for this tiny model (~30k parameters)
  return o;
}

// The rank body, run as a child: trains and writes this rank's parameters.
TEST(DistWorker, Train) {
  at::set_num_threads(1);
  parallel::CommOptions co;
  co.timeout_s = std::atof(env("PTK_DT_TIMEOUT"));
  parallel::Comm comm = parallel::Comm::from_environment(co);
  const int die_at = std::atoi(env("PTK_DT_DIE_AT")), die_rank = std::atoi(env("PTK_DT_DIE_RANK"));
  test::TinyLmStage stage(kDocs, std::atoi(env("PTK_DT_MBS")), kSeed, [&](int64_t n) {
    if (n == die_at && (die_rank < 0 || die_rank == comm.rank())) std::raise(SIGKILL);
  });
  auto o = options(env("PTK_DT_RUN_DIR"), env("PTK_DT_SHARDING"), std::atoi(env("PTK_DT_CKPT")));
  o.comm = comm;
  // PTK_DT_DIE_IN_BACKWARD=k: rank PTK_DT_DIE_RANK dies in its k-th backward, when the embedding's
  // gradient arrives (the last in backward order: the other buckets are on their way by then).
  const int die_in_backward = std::atoi(env("PTK_DT_DIE_IN_BACKWARD"));
  int backwards = 0;
  if (die_in_backward > 0 && die_rank == comm.rank())
    stage.parameters().front().second.register_hook([&](const at::Tensor& g) {
      if (++backwards == die_in_backward) std::raise(SIGKILL);
      return g;
    });
  Trainer t(stage, o);
  t.run();
  checkpoint::write_safetensors(std::string(env("PTK_DT_OUT")) + "-rank" + std::to_string(comm.rank()) + ".safetensors",
                                stage.parameters());
}

struct RunResult {
  std::vector<int> codes;
  std::vector<std::string> logs;
};

RunResult run_ranks(const std::string& run_dir, const std::string& out, const std::string& sharding, int ckpt,
                    int die_at = 0, int die_rank = -1, double timeout = 60, int die_in_backward = 0, int world = 2) {
  int port = test::free_port();
  std::vector<test::Child> kids;
  for (int r = 0; r < world; ++r) {
    auto e = test::rank_env(r, world, port);
    e.insert(e.end(), {"PTK_DT_RUN_DIR=" + run_dir, "PTK_DT_OUT=" + out, "PTK_DT_MBS=2",
                       "PTK_DT_SHARDING=" + sharding, "PTK_DT_CKPT=" + std::to_string(ckpt),
                       "PTK_DT_DIE_IN_BACKWARD=" + std::to_string(die_in_backward),
                       "PTK_DT_DIE_AT=" + std::to_string(die_at), "PTK_DT_DIE_RANK=" + std::to_string(die_rank),
                       "PTK_DT_TIMEOUT=" + std::to_string(timeout)});
    kids.push_back(test::spawn_worker("DistWorker.Train", e, out + "-rank" + std::to_string(r) + ".log"));
  }
  RunResult res;
  for (auto& k : kids) res.codes.push_back(test::wait_child(k, timeout + 120));
  for (int r = 0; r < world; ++r) res.logs.push_back(read_file(out + "-rank" + std::to_string(r) + ".log"));
  return res;
}

std::map<std::string, at::Tensor> load(const std::string& f) {
  auto m = checkpoint::read_safetensors(f);
  return {m.begin(), m.end()};
}

double max_diff(const std::map<std::string, at::Tensor>& a, const optim::NamedTensors& b) {
  double d = 0;
  for (auto& [n, t] : b) d = std::max(d, (a.at(n) - t).abs().max().item<double>());
  return d;
}
double max_diff(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  return max_diff(a, optim::NamedTensors(b.begin(), b.end()));
}

std::vector<rapidjson::Document> metric_lines(const std::string& run_dir) {
  std::vector<rapidjson::Document> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line, "metrics"));
  return out;
}

std::map<std::string, at::Tensor> reference_start() {
  test::TinyLmStage s(kDocs, 4, kSeed);
  std::map<std::string, at::Tensor> m;
  for (auto& [n, t] : s.parameters()) m[n] = t.detach().clone();
  return m;
}

// 1 rank, micro-batch `mbs` x `grad_accum`, in this process: the reference. Micro-batch 4 x 2 and 2 x 4
// read the rows 2 ranks x micro-batch 2 x 2 read, step by step.
optim::NamedTensors reference(const std::string& dir, int64_t mbs = 4, int64_t grad_accum = 2) {
  at::set_num_threads(1);
  static std::unique_ptr<test::TinyLmStage> stage;
  stage = std::make_unique<test::TinyLmStage>(kDocs, mbs, kSeed);
  Trainer(*stage, options(dir, "none", 0, grad_accum)).run();
  return stage->parameters();
}

TEST(DataParallel, TwoRanksEqualOneRankWithDoubleBatch) {
  test::TempDir d;
  auto ref = reference(d.file("ref"));
  auto ref_metrics = metric_lines(d.file("ref"));
  std::map<std::string, at::Tensor> plain_params;
  for (const std::string sharding : {"none", "zero1", "zero2"}) {
    const bool zero1 = sharding == "zero1", zero2 = sharding == "zero2";
    std::string name = sharding == "none" ? "ddp" : sharding;
    auto res = run_ranks(d.file(name), d.file(name), sharding, 0);
    for (int r = 0; r < 2; ++r) ASSERT_EQ(res.codes[r], 0) << name << " rank " << r << ":\n" << res.logs[r];
    auto p0 = load(d.file(name + "-rank0.safetensors")), p1 = load(d.file(name + "-rank1.safetensors"));
    double diff = max_diff(p0, ref), ranks = max_diff(p0, p1);
    std::printf("%s: 2 ranks x micro-batch 2 vs 1 rank x micro-batch 4 after 8 steps: max |param diff| %.3g; "
                "rank 0 vs rank 1: %.3g\n", name.c_str(), diff, ranks);
    EXPECT_LT(diff, 1e-5) << name;
    EXPECT_EQ(ranks, 0.0) << name << ": ranks drifted apart";
    EXPECT_GT(max_diff(p0, reference_start()), 1e-3) << "training did not move the parameters";
    if (sharding == "none") plain_params = p0;
    else if (zero1) EXPECT_EQ(max_diff(p0, plain_params), 0.0) << "ZeRO-1 differs from plain data parallel";
    // ZeRO-2 sums each micro-batch over ranks before the micro-batches (plain: the other way round):
    // the same terms in another order.
    if (zero2) {
      const double vs_plain = max_diff(p0, plain_params);
      std::printf("zero2 vs plain data parallel: max |param diff| %.3g\n", vs_plain);
      EXPECT_LT(vs_plain, 1e-5) << "ZeRO-2 differs from plain data parallel";
    }
    // Rank 0 wrote the run folder; the metrics are the global ones.
    auto m = metric_lines(d.file(name));
    ASSERT_EQ(m.size(), ref_metrics.size());
    for (size_t i = 0; i < m.size(); ++i) {
      EXPECT_NEAR(m[i]["loss"].GetDouble(), ref_metrics[i]["loss"].GetDouble(), 1e-5) << name << " step " << i + 1;
      EXPECT_NEAR(m[i]["grad_norm"].GetDouble(), ref_metrics[i]["grad_norm"].GetDouble(), 1e-4) << "step " << i + 1;
      EXPECT_NEAR(m[i]["mean_token_accuracy"].GetDouble(), ref_metrics[i]["mean_token_accuracy"].GetDouble(), 1e-12);
      EXPECT_EQ(m[i]["num_tokens"].GetDouble(), ref_metrics[i]["num_tokens"].GetDouble());
      // A plain metric: the mean over ranks of per-rank values, i.e. half the 1-rank value here.
      EXPECT_DOUBLE_EQ(2 * m[i]["rank_local_targets"].GetDouble(), ref_metrics[i]["rank_local_targets"].GetDouble());
    }
    EXPECT_TRUE(path_exists(d.file(name) + "/final/model.safetensors"));
  }
}

// N ranks x grad_accum K equal 1 rank x grad_accum N*K with the same micro-batch (2 rows): here ZeRO-2
// reduce-scatters 2 micro-batches a step on each rank where 1 rank accumulates 4 locally.
TEST(DataParallel, TwoRanksEqualOneRankWithDoubleAccumulation) {
  test::TempDir d;
  auto ref = reference(d.file("ref"), /*mbs=*/2, /*grad_accum=*/4);
  auto ref_metrics = metric_lines(d.file("ref"));
  ASSERT_EQ(ref_metrics.size(), 8u);
  EXPECT_GT(max_diff(reference_start(), ref), 1e-3) << "the reference did not train";
  for (const std::string sharding : {"zero2", "none"}) {
    auto res = run_ranks(d.file(sharding), d.file(sharding), sharding, 0);
    for (int r = 0; r < 2; ++r) ASSERT_EQ(res.codes[r], 0) << sharding << " rank " << r << ":\n" << res.logs[r];
    auto p0 = load(d.file(sharding + "-rank0.safetensors")), p1 = load(d.file(sharding + "-rank1.safetensors"));
    const double diff = max_diff(p0, ref);
    std::printf("%s: 2 ranks x (2 rows x 2 micro-batches) vs 1 rank x (2 rows x 4 micro-batches) after 8 steps: "
                "max |param diff| %.3g\n", sharding.c_str(), diff);
    EXPECT_LT(diff, 1e-5) << sharding;
    EXPECT_EQ(max_diff(p0, p1), 0.0) << sharding << ": ranks drifted apart";
    auto m = metric_lines(d.file(sharding));
    ASSERT_EQ(m.size(), ref_metrics.size());
    for (size_t i = 0; i < m.size(); ++i) {
      // The loss and the pre-clip norm of the whole gradient (ZeRO-2: from the shards' squared norms).
      EXPECT_NEAR(m[i]["loss"].GetDouble(), ref_metrics[i]["loss"].GetDouble(), 1e-5) << sharding << " step " << i + 1;
      EXPECT_NEAR(m[i]["grad_norm"].GetDouble() / ref_metrics[i]["grad_norm"].GetDouble(), 1.0, 1e-5)
          << sharding << " step " << i + 1;
      EXPECT_EQ(m[i]["num_tokens"].GetDouble(), ref_metrics[i]["num_tokens"].GetDouble());
    }
  }
}

// 3 ranks: every bucket is cut in 3 chunks (the last padded, chunk edges inside parameters).
// 3 ranks x 2 rows = 1 rank x 6 rows per micro-batch, 2 micro-batches a step, 5 steps.
TEST(DataParallel, ThreeRanksWithZeroTwoEqualOneRank) {
  test::TempDir d;
  auto ref = reference(d.file("ref"), /*mbs=*/6, /*grad_accum=*/2);
  auto res = run_ranks(d.file("zero2"), d.file("zero2"), "zero2", 0, 0, -1, 60, 0, /*world=*/3);
  for (int r = 0; r < 3; ++r) ASSERT_EQ(res.codes[r], 0) << "rank " << r << ":\n" << res.logs[r];
  auto p0 = load(d.file("zero2-rank0.safetensors"));
  const double diff = max_diff(p0, ref);
  std::printf("zero2: 3 ranks x 2 rows vs 1 rank x 6 rows after 5 steps: max |param diff| %.3g\n", diff);
  EXPECT_LT(diff, 1e-5);
  EXPECT_GT(max_diff(reference_start(), ref), 1e-3) << "the reference did not train";
  for (int r = 1; r < 3; ++r)
    EXPECT_EQ(max_diff(p0, load(d.file("zero2-rank" + std::to_string(r) + ".safetensors"))), 0.0) << "rank " << r;
  auto m = metric_lines(d.file("zero2")), mr = metric_lines(d.file("ref"));
  ASSERT_EQ(m.size(), 5u);
  ASSERT_EQ(mr.size(), 5u);
  for (size_t i = 0; i < m.size(); ++i)
    EXPECT_NEAR(m[i]["grad_norm"].GetDouble() / mr[i]["grad_norm"].GetDouble(), 1.0, 1e-5) << "step " << i + 1;
}

// Kills both ranks in step 6 (checkpoints every 2 steps), resumes with 2 ranks: the result equals
// the run that never stopped. Then ZeRO-1's and ZeRO-2's checkpoints refuse 1 rank and another mode.
TEST(DataParallel, ResumeAfterBothRanksAreKilled) {
  for (const std::string sharding : {"none", "zero1", "zero2"}) {
    const bool zero1 = sharding == "zero1";
    test::TempDir d;
    std::string name = sharding == "none" ? "ddp" : sharding;
    auto full = run_ranks(d.file("full"), d.file("full"), sharding, 2);
    ASSERT_EQ(full.codes[0], 0) << full.logs[0];
    auto killed = run_ranks(d.file("run"), d.file("killed"), sharding, 2, /*die_at=*/11, /*die_rank=*/-1);
    for (int r = 0; r < 2; ++r) EXPECT_NE(killed.codes[r], 0) << "rank " << r << " was not killed";
    EXPECT_EQ(killed.codes[0], 128 + SIGKILL) << killed.logs[0];
    ASSERT_TRUE(path_exists(d.file("run") + "/checkpoints/step-4/DONE"));
    if (sharding != "none") {
      for (const char* f : {"optimizer-rank-0.safetensors", "optimizer-rank-1.safetensors", "rng-rank-1.safetensors",
                            "cursor-rank-1.json"})
        EXPECT_TRUE(path_exists(d.file("run") + "/checkpoints/step-4/trainer_state/" + f)) << f;
      EXPECT_FALSE(path_exists(d.file("run") + "/checkpoints/step-4/trainer_state/optimizer.safetensors"));
    }
    auto resumed = run_ranks(d.file("run"), d.file("resumed"), sharding, 2);
    for (int r = 0; r < 2; ++r) ASSERT_EQ(resumed.codes[r], 0) << resumed.logs[r];
    EXPECT_NE(resumed.logs[0].find("resumed from"), std::string::npos) << resumed.logs[0];
    double diff = max_diff(load(d.file("resumed-rank0.safetensors")), load(d.file("full-rank0.safetensors")));
    std::printf("%s: killed at step 6, resumed from step 4: max |param diff| vs uninterrupted %.3g\n", name.c_str(),
                diff);
    EXPECT_EQ(diff, 0.0) << name;
    auto a = metric_lines(d.file("run")), b = metric_lines(d.file("full"));
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i]["loss"].GetDouble(), b[i]["loss"].GetDouble()) << i + 1;
    if (zero1) {
      // One rank cannot take over two ranks' optimizer shards.
      at::set_num_threads(1);
      test::TinyLmStage stage(kDocs, 4, kSeed);
      auto o = options(d.file("run"), "zero1", 2);
      o.max_steps = 12;
      try {
        Trainer(stage, o).run();
        ADD_FAILURE() << "a 2-rank ZeRO-1 checkpoint was resumed by 1 rank";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("ZeRO-1 optimizer shards for 2 ranks, this run has 1"), std::string::npos)
            << e.what();
      }
      o.zero1 = false;
      try {
        Trainer(stage, o).run();
        ADD_FAILURE() << "a ZeRO-1 checkpoint was resumed without ZeRO-1";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("train.zero1=true"), std::string::npos) << e.what();
      }
    }
    if (sharding == "zero2") {
      // A shard holds this rank's chunks of every bucket (and their ranges), not a whole parameter.
      auto shard = load(d.file("run") + "/checkpoints/step-8/trainer_state/optimizer-rank-1.safetensors");
      int64_t owned = 0, total = 0;
      for (auto& [n, t] : shard)
        if (n.rfind("exp_avg.", 0) == 0) owned += t.numel();
      for (auto& [n, t] : reference_start()) total += t.numel();
      EXPECT_GT(owned, 0);
      EXPECT_LT(owned, total * 3 / 5) << "rank 1's ZeRO-2 shard holds " << owned << " of " << total << " elements";
      at::set_num_threads(1);
      test::TinyLmStage stage(kDocs, 4, kSeed);
      auto o = options(d.file("run"), "zero2", 2);
      o.max_steps = 12;
      try {
        Trainer(stage, o).run();
        ADD_FAILURE() << "a 2-rank ZeRO-2 checkpoint was resumed by 1 rank";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("ZeRO-2 optimizer shards for 2 ranks, this run has 1"), std::string::npos)
            << e.what();
      }
      o = options(d.file("run"), "zero1", 2);
      o.max_steps = 12;
      try {
        Trainer(stage, o).run();
        ADD_FAILURE() << "a ZeRO-2 checkpoint was resumed with ZeRO-1";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("was written with train.sharding=zero2, this run has train.sharding=zero1"),
                  std::string::npos)
            << e.what();
      }
    }
  }
}

// train.zero1=true is train.sharding=zero1; beside zero2 it is refused before anything runs.
TEST(DataParallel, ZeroOneAndZeroTwoTogetherAreRefused) {
  test::TempDir d;
  auto o = options(d.file("run"), "zero2", 0);
  EXPECT_EQ(sharding_mode(o), "zero2");
  o.zero1 = true;
  try {
    sharding_mode(o);
    ADD_FAILURE() << "train.zero1=true with train.sharding=zero2 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.zero1=true (the older spelling of train.sharding=zero1) conflicts"),
              std::string::npos)
        << e.what();
  }
  o.sharding = "none";
  EXPECT_EQ(sharding_mode(o), "zero1");
  o.sharding = "zero1";
  EXPECT_EQ(sharding_mode(o), "zero1");
}

TEST(DataParallel, DeadRankMakesTheOtherFailWithinTheTimeout) {
  test::TempDir d;
  auto t0 = std::chrono::steady_clock::now();
  auto res = run_ranks(d.file("run"), d.file("die"), "none", 0, /*die_at=*/5, /*die_rank=*/1, /*timeout=*/15);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(res.codes[1], 128 + SIGKILL);
  EXPECT_NE(res.codes[0], 0) << res.logs[0];
  EXPECT_NE(res.codes[0], -1) << "rank 0 hung past the deadline";
  EXPECT_NE(res.logs[0].find("failed on rank 0 of 2"), std::string::npos) << res.logs[0];
  EXPECT_LT(s, 15 + 30);
  auto at = res.logs[0].find("dist:");
  std::printf("rank 0 exited %d after %.1f s: %s\n", res.codes[0], s,
              at == std::string::npos ? "?" : res.logs[0].substr(at, 300).c_str());
}

// ZeRO-2: rank 1 dies inside the backward of step 2's second micro-batch, while its reduce-scatters
// are on their way; rank 0 fails in one of them (or the next collective) with a clear error.
TEST(DataParallel, DeadRankInsideAZeroTwoStepFailsTheOther) {
  test::TempDir d;
  auto res = run_ranks(d.file("run"), d.file("die"), "zero2", 0, /*die_at=*/0, /*die_rank=*/1, /*timeout=*/15,
                       /*die_in_backward=*/4);
  EXPECT_EQ(res.codes[1], 128 + SIGKILL) << res.logs[1];
  EXPECT_NE(res.codes[0], 0) << res.logs[0];
  EXPECT_NE(res.codes[0], -1) << "rank 0 hung past the deadline";
  EXPECT_NE(res.logs[0].find("failed on rank 0 of 2"), std::string::npos) << res.logs[0];
  EXPECT_NE(res.logs[0].find("HINT: another rank probably exited"), std::string::npos) << res.logs[0];
  auto at = res.logs[0].find("dist:");
  std::printf("rank 0 exited %d: %s\n", res.codes[0], at == std::string::npos ? "?" : res.logs[0].substr(at, 300).c_str());
}

}  // namespace
}  // namespace ptk::train

