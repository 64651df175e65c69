// metrics.jsonl writer and the progress line.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>

#include "core/train/metrics.h"
#include "core/train/progress.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

TEST(Metrics, OneOrderedObjectPerLineNanAsNull) {
  test::TempDir d;
  std::string p = d.file("run/metrics.jsonl");
  {
    MetricsWriter w(p);
    w.write(1, Metrics().add("loss", 2.5).add("lr", 1e-5).add("grad_norm", std::nan("")));
    w.write(2, Metrics().add("loss", 2.0).add("tokens_per_s", 1000));
  }
  EXPECT_EQ(read_file(p),
            "{\"step\":1,\"loss\":2.5,\"lr\":0.00001,\"grad_norm\":null}\n"
            "{\"step\":2,\"loss\":2,\"tokens_per_s\":1000}\n");
}

TEST(Metrics, ResumeDropsLaterStepsAndTornLines) {
  test::TempDir d;
  std::string p = d.write("metrics.jsonl", "{\"step\":1,\"loss\":3}\n{\"step\":2,\"loss\":2}\n{\"step\":3,\"lo");
  {
    MetricsWriter w(p, /*truncate_after_step=*/1);
    w.write(2, Metrics().add("loss", 2.25));
  }
  EXPECT_EQ(read_file(p), "{\"step\":1,\"loss\":3}\n{\"step\":2,\"loss\":2.25}\n");
}

TEST(Progress, LineShowsRateEtaAndUnits) {
  test::TempDir d;
  FILE* f = std::fopen(d.file("log").c_str(), "w");
  Progress p("train", 100, "steps", 10.0, f);
  EXPECT_FALSE(p.is_tty());
  std::string l = p.line(25, 50.0, "loss 1.5");
  EXPECT_EQ(l, "train 25/100 steps (25.0%) | 0.50 steps/s | elapsed 50.0s | ETA 2m30s | loss 1.5");
  p.update(100, "done");  // reaching the total always prints in logs
  p.finish();
  std::fclose(f);
  std::string log = read_file(d.file("log"));
  EXPECT_NE(log.find("train 100/100 steps (100.0%)"), std::string::npos) << log;
}

// A run resumed at step 80 of 100: the rate and ETA count this process's steps, not the 80 before
// (the first line of a resumed run once read 80 steps in a few milliseconds: millions of steps/s).
TEST(Progress, ResumedRunRateCountsThisProcessOnly) {
  test::TempDir d;
  FILE* f = std::fopen(d.file("log").c_str(), "w");
  Progress p("train", 100, "steps", 10.0, f);
  p.set_start(80);
  EXPECT_EQ(p.line(80, 0.001, ""), "train 80/100 steps (80.0%) | 0.00 steps/s | elapsed 0.0s");
  EXPECT_EQ(p.line(90, 20.0, ""), "train 90/100 steps (90.0%) | 0.50 steps/s | elapsed 20.0s | ETA 20.0s");
  p.finish();
  std::fclose(f);
}

}  // namespace
}  // namespace ptk
