// What a run shows on screen and writes beside its metrics: each stage's progress-line metrics with
// units, the eval line, the end-of-run summary, report.md's tables, the TensorBoard event encoding
// (CRC32C test vectors of RFC 3720, TFRecord framing, tensorflow.Event bytes), and the CPU peak MFU
// is computed against.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/train/metrics.h"
#include "core/train/peak_flops.h"
#include "core/train/plot.h"
#include "core/train/progress.h"
#include "core/train/stage_view.h"
#include "core/train/tensorboard.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

using namespace ptk::train;

std::string hex(const std::string& s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += d[c >> 4];
    out += d[c & 15];
  }
  return out;
}

TEST(StageView, ProgressLineShowsEachStagesMetricsWithUnits) {
  Metrics dpo;
  dpo.add("loss", 0.69314).add("lr", 1e-4).add("learning_rate", 1e-4).add("grad_norm", 0.5321);
  dpo.add("tokens_per_s", 12345.4).add("mfu", 0.0312).add("rewards/chosen", 0.0123).add("rewards/rejected", -0.06);
  dpo.add("rewards/accuracies", 0.625).add("rewards/margins", 0.0723);
  EXPECT_EQ(progress_metrics(stage_view("dpo"), dpo),
            "loss 0.6931 | rewards/accuracies 62.5% | rewards/margins 0.0723 | rewards/chosen 0.0123 | "
            "rewards/rejected -0.06 | lr 1.00e-04 | grad_norm 0.5321 | 12,345 tok/s | MFU 3.1%");
  Metrics sft;
  sft.add("loss", 1.25).add("learning_rate", 3e-3).add("grad_norm", 2).add("tokens_per_s", 999.6);
  sft.add("mean_token_accuracy", 0.4567).add("entropy", 1.5);
  EXPECT_EQ(progress_metrics(stage_view("sft"), sft),
            "loss 1.25 | mean_token_accuracy 45.7% | entropy 1.5 | lr 3.00e-03 | grad_norm 2 | 1,000 tok/s");
  Metrics rm;
  rm.add("loss", 0.6).add("accuracy", 0.75).add("margin", 0.2).add("tokens_per_s", 50);
  EXPECT_EQ(progress_metrics(stage_view("rm"), rm), "loss 0.6 | accuracy 75.0% | margin 0.2 | 50 tok/s");
  Metrics grpo;
  grpo.add("loss", 0.01).add("reward", 1.127).add("reward_std", 0.43).add("kl", 0.00123);
  grpo.add("clip_ratio/region_mean", 0.005).add("completions/mean_length", 18.25).add("tokens_per_s", 1234567);
  EXPECT_EQ(progress_metrics(stage_view("grpo"), grpo),
            "reward 1.127 | reward_std 0.43 | kl 0.00123 nats | clip_ratio/region_mean 0.5% | "
            "completions/mean_length 18.2 tok | 1,234,567 tok/s");
  // A generation step's phases close GRPO's line, in step order (absent ones, e.g. no reference, skipped).
  grpo.add("time/update_s", 2.5).add("time/generate_s", 12.25).add("time/score_s", 0.5);
  EXPECT_EQ(progress_metrics(stage_view("grpo"), grpo),
            "reward 1.127 | reward_std 0.43 | kl 0.00123 nats | clip_ratio/region_mean 0.5% | "
            "completions/mean_length 18.2 tok | time/generate_s 12.2s | time/score_s 0.5s | time/update_s 2.5s | 1,234,567 tok/s");
  // A NaN (no target in the step) says so instead of printing "nan".
  Metrics nan;
  nan.add("loss", std::nan(""));
  EXPECT_EQ(progress_metrics(stage_view("sft"), nan), "loss n/a");
}

TEST(StageView, UnitsAndDirections) {
  EXPECT_EQ(unit_of("eval/rewards/accuracies"), Unit::kPercent);
  EXPECT_EQ(unit_of("frac_reward_zero_std"), Unit::kPercent);
  EXPECT_EQ(unit_of("completions/mean_length"), Unit::kTokens);
  EXPECT_EQ(unit_of("generation/tokens_per_s"), Unit::kRate);
  EXPECT_EQ(unit_of("time/generate_s"), Unit::kSeconds);
  EXPECT_EQ(unit_of("loss"), Unit::kPlain);
  EXPECT_EQ(format_value(0.00001, Unit::kPercent), "0.001%");
  EXPECT_EQ(format_value(1.0, Unit::kPercent), "100.0%");
  EXPECT_EQ(format_value(150, Unit::kSeconds), "2m30s");
  EXPECT_EQ(better_direction("eval/loss"), -1);
  EXPECT_EQ(better_direction("eval/accuracy"), +1);
  EXPECT_EQ(better_direction("eval/completions/mean_length"), 0);
}

TEST(StageView, EvalLineListsTheStagesEvalMetricsFirst) {
  Metrics e;
  e.add("completions/mean_length", 18).add("accuracy", 0.927).add("loss", 0.0005).add("mean_token_accuracy", 0.999);
  e.add("custom", 3);
  EXPECT_EQ(eval_line("sft", 500, 2000, stage_view("sft"), e, 12.34),
            "sft eval at step 500/2000: loss 0.0005 | mean_token_accuracy 99.9% | accuracy 92.7% | "
            "completions/mean_length 18.0 tok (12.3s)");
  // A stage's other eval metrics stay in metrics.jsonl and report.md, unless it has none of the view's.
  Metrics other;
  other.add("custom", 3).add("eval/custom_accuracy", 0.5);
  EXPECT_EQ(eval_line("sft", 1, 2, stage_view("sft"), other, 0.5), "sft eval at step 1/2: custom 3 | custom_accuracy 50.0% (0.5s)");
}

TEST(Progress, MessageGoesOnItsOwnLine) {
  test::TempDir d;
  FILE* f = std::fopen(d.file("log").c_str(), "w");
  {
    Progress p("sft", 4, "steps", 0.0, f);
    p.update(2, "loss 1");
    p.message("sft eval at step 2/4: loss 1");
    p.update(4, "loss 0.5");
  }
  std::fclose(f);
  std::string log = read_file(d.file("log"));
  EXPECT_NE(log.find("\nsft eval at step 2/4: loss 1\nsft 4/4 steps (100.0%)"), std::string::npos) << log;
}

// Steps 1..10 of a DPO-like log, evals at 5 and 10, an eval before training.
plot::MetricsLog dpo_log(const std::string& dir) {
  MetricsWriter w(dir + "/metrics.jsonl");
  for (int s = 1; s <= 10; ++s) {
    Metrics m;
    m.add("loss", 1.0 / s).add("learning_rate", 1e-4).add("grad_norm", 0.5).add("tokens_per_s", 1000);
    m.add("step_time_s", 0.5).add("num_tokens", 100.0 * s).add("rewards/accuracies", 0.5 + s / 40.0);
    m.add("rewards/margins", 0.01 * s);
    if (s % 5 == 0) m.add("eval/loss", s == 5 ? 0.4 : 0.45).add("eval/rewards/accuracies", s == 5 ? 0.6 : 0.7);
    w.write(s, m);
  }
  return plot::read_metrics(dir + "/metrics.jsonl", "dpo");
}

TEST(StageView, SummaryHasLastBestEvalsTokensAndPlaces) {
  test::TempDir d;
  auto log = dpo_log(d.path());
  RunFacts f{"dpo", "runs/dpo", 10, 10, 4, 65.0, true};
  Metrics before;
  before.add("eval/accuracy", 0.99);
  std::string s = run_summary(f, stage_view("dpo"), log, before);
  EXPECT_NE(s.find("dpo finished: step 10/10 in 1m05s (this process: steps 4 -> 10); 1,000 tokens trained "
                   "(200 tok/s over 5.0s of steps)"),
            std::string::npos)
      << s;
  EXPECT_NE(s.find("last step (10): loss 0.1 | rewards/accuracies 75.0% | rewards/margins 0.1"), std::string::npos) << s;
  EXPECT_NE(s.find("before training: accuracy 99.0%"), std::string::npos) << s;
  EXPECT_NE(s.find("last eval (step 10): loss 0.45 | rewards/accuracies 70.0%"), std::string::npos) << s;
  EXPECT_NE(s.find("best eval: loss 0.4 at step 5 | rewards/accuracies 70.0% at step 10"), std::string::npos) << s;
  EXPECT_NE(s.find("final model: runs/dpo/final"), std::string::npos) << s;
  EXPECT_NE(s.find("report: runs/dpo/report.md"), std::string::npos) << s;
  EXPECT_NE(s.find("tensorboard --logdir runs/dpo/tb"), std::string::npos) << s;
}

TEST(StageView, ReportHasTheStagesTablesAndCurves) {
  test::TempDir d;
  auto log = dpo_log(d.path());
  RunFacts f{"dpo", d.path(), 10, 10, 0, 5.0, false};
  Metrics before;
  before.add("eval/accuracy", 0.99);
  std::string md = stage_report(f, stage_view("dpo"), log, before, {}, /*rows=*/4);
  EXPECT_NE(md.find("## Eval results\n\n| step | eval/loss | eval/rewards/accuracies | eval/accuracy |\n"
                    "| ---: | ---: | ---: | ---: |\n"
                    "| 0 (before training) |  |  | 99.0% |\n"
                    "| 5 | 0.4 | 60.0% |  |\n"
                    "| 10 | 0.45 | 70.0% |  |\n"),
            std::string::npos)
      << md;
  // 10 steps in about 4 rows: every 5 steps (1, 2, 5 x 10^k).
  EXPECT_NE(md.find("## Training metrics (every 5 steps, and the last)\n\n"
                    "| step | loss | rewards/accuracies | rewards/margins | learning_rate | grad_norm |\n"),
            std::string::npos)
      << md;
  EXPECT_NE(md.find("| 5 | 0.2 | 62.5% | 0.05 | 1.00e-04 | 0.5 |\n| 10 | 0.1 | 75.0% | 0.1 | 1.00e-04 | 0.5 |\n"),
            std::string::npos)
      << md;
  // DPO's curves, not SFT's.
  EXPECT_NE(md.find("![rewards/accuracies](plots/rewards_accuracies.svg)"), std::string::npos) << md;
  EXPECT_NE(md.find("![eval/rewards/accuracies]"), std::string::npos) << md;
  EXPECT_EQ(md.find("mean_token_accuracy"), std::string::npos) << md;
}

TEST(StageView, GrpoReportPlotsEachRewardFunction) {
  test::TempDir d;
  {
    MetricsWriter w(d.file("metrics.jsonl"));
    for (int s = 1; s <= 3; ++s)
      w.write(s, Metrics().add("loss", 0.1).add("reward", 0.5 * s).add("rewards/math/mean", 0.1 * s).add("kl", 0.01));
  }
  auto log = plot::read_metrics(d.file("metrics.jsonl"), "grpo");
  RunFacts f{"grpo", d.path(), 3, 3, 0, 1.0, false};
  std::string md = stage_report(f, stage_view("grpo"), log, Metrics(), {});
  EXPECT_NE(md.find("| step | reward | kl | loss |\n"), std::string::npos) << md;
  EXPECT_NE(md.find("| 3 | 1.5 | 0.01 nats | 0.1 |\n"), std::string::npos) << md;
  EXPECT_NE(md.find("![reward](plots/reward.svg)"), std::string::npos) << md;
  EXPECT_NE(md.find("![rewards/math/mean](plots/rewards_math_mean.svg)"), std::string::npos) << md;
  EXPECT_EQ(md.find("## Eval results"), std::string::npos) << md;  // no eval ran
}

// RFC 3720 (iSCSI) appendix B.4 test vectors and the check value of CRC-32C.
TEST(TensorBoard, Crc32cTestVectors) {
  EXPECT_EQ(tb::crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(tb::crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(tb::crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  EXPECT_EQ(tb::crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(tb::masked_crc32c(""), 0xA282EAD8u);  // crc 0: the mask's constant
  EXPECT_EQ(tb::masked_crc32c(std::string(8, '\0')), 0x07980329u);
}

TEST(TensorBoard, RecordFraming) {
  std::string r = tb::tfrecord("abc");
  ASSERT_EQ(r.size(), 8u + 4 + 3 + 4);
  EXPECT_EQ(hex(r.substr(0, 8)), "0300000000000000");
  uint32_t len_crc, data_crc;
  std::memcpy(&len_crc, r.data() + 8, 4);
  std::memcpy(&data_crc, r.data() + 15, 4);
  EXPECT_EQ(len_crc, tb::masked_crc32c(r.substr(0, 8)));
  EXPECT_EQ(r.substr(12, 3), "abc");
  EXPECT_EQ(data_crc, tb::masked_crc32c("abc"));
}

TEST(TensorBoard, EventBytesFollowEventProto) {
  // wall_time (1, fixed64) = 2.0, file_version (3, bytes) = "brain.Event:2".
  EXPECT_EQ(hex(tb::file_version_event(2.0)), "090000000000000040" "1a0d" + hex("brain.Event:2"));
  // step (2, varint) = 3; summary (5) { value (1) { tag (1) = "train/loss", simple_value (2, fixed32) = 0.5 } }.
  EXPECT_EQ(hex(tb::scalars_event(2.0, 3, {{"train/loss", 0.5}})),
            "090000000000000040" "1003" "2a13" "0a11" "0a0a" + hex("train/loss") + "150000003f");
  // session_log (7) { status (1) = START (1) } at step 300 (varint ac 02).
  EXPECT_EQ(hex(tb::session_start_event(2.0, 300)), "090000000000000040" "10ac02" "3a02" "0801");
  EXPECT_EQ(tb::tag_of("loss"), "train/loss");
  EXPECT_EQ(tb::tag_of("eval/rewards/accuracies"), "eval/rewards/accuracies");
}

TEST(TensorBoard, WriterFramesEveryEventAndSkipsNaN) {
  test::TempDir d;
  std::string path;
  {
    tb::EventWriter w(d.file("tb"), 0);
    path = w.path();
    w.write(1, {{"loss", 2.5}, {"grad_norm", std::nan("")}});
    // Flushed per step: the bytes are in the file before the writer closes.
    EXPECT_EQ(read_file(path).size(), tb::tfrecord(tb::file_version_event(0)).size() +
                                          tb::tfrecord(tb::session_start_event(0, 1)).size() +
                                          tb::tfrecord(tb::scalars_event(0, 1, {{"train/loss", 2.5}})).size());
  }
  EXPECT_NE(std::filesystem::path(path).filename().string().find("events.out.tfevents."), std::string::npos);
  // Walk the records: every length and CRC checks out.
  std::string all = read_file(path);
  size_t at = 0;
  int records = 0;
  while (at < all.size()) {
    uint64_t n;
    uint32_t c1, c2;
    ASSERT_LE(at + 12, all.size());
    std::memcpy(&n, all.data() + at, 8);
    std::memcpy(&c1, all.data() + at + 8, 4);
    EXPECT_EQ(c1, tb::masked_crc32c(all.substr(at, 8)));
    ASSERT_LE(at + 12 + n + 4, all.size());
    std::memcpy(&c2, all.data() + at + 12 + n, 4);
    EXPECT_EQ(c2, tb::masked_crc32c(all.substr(at + 12, n)));
    at += 12 + n + 4;
    ++records;
  }
  EXPECT_EQ(records, 3);
}

TEST(TensorBoard, EachNewFileSortsAfterTheEarlierOnes) {
  // TensorBoard reads a folder's files in name order; a resumed run's file must come last even when
  // it starts in the same second as the one before, or an earlier file's name carries a later time.
  test::TempDir d;
  make_dirs(d.file("tb"));
  write_file_atomic(d.file("tb/events.out.tfevents.4000000000.otherhost.99999"), "");
  std::vector<std::string> made;
  for (int i = 0; i < 3; ++i) {
    tb::EventWriter w(d.file("tb"), i);
    made.push_back(std::filesystem::path(w.path()).filename().string());
  }
  EXPECT_EQ(made[0].substr(0, 31), "events.out.tfevents.4000000001.");
  EXPECT_EQ(made[2].substr(0, 31), "events.out.tfevents.4000000003.");
  std::vector<std::string> sorted = made;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, made);
  EXPECT_GT(made[0], "events.out.tfevents.4000000000.otherhost.99999");
}

TEST(PeakFlops, TheoreticalPeakFromCpuinfo) {
  const std::string xeon =
      "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\ncpu MHz\t\t: 2600.000\n"
      "flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_bf16 amx_bf16\nprocessor\t: 1\ncpu MHz\t\t: 2500.000\n";
  auto p = cpu_peak_flops(xeon, "", 2, false);
  EXPECT_EQ(p.isa, "avx512");
  EXPECT_DOUBLE_EQ(p.ghz, 2.6);
  EXPECT_DOUBLE_EQ(p.flops, 2 * 2.6e9 * 64);
  EXPECT_EQ(cpu_peak_flops(xeon, "", 2, true).isa, "amx_bf16");
  // cpufreq's maximum (turbo) wins over the current clock; "@ GHz" in the model name counts too.
  EXPECT_DOUBLE_EQ(cpu_peak_flops(xeon, "3500000\n", 1, false).ghz, 3.5);
  auto old = cpu_peak_flops("model name\t: Intel(R) Core(TM) i7 CPU @ 2.80GHz\nflags\t: sse sse2 avx\n", "", 4, false);
  EXPECT_EQ(old.isa, "avx");
  EXPECT_DOUBLE_EQ(old.flops, 4 * 2.8e9 * 16);
  EXPECT_EQ(cpu_peak_flops("flags\t: sse2 avx2 fma\n", "", 4, false).flops, 0);  // no clock: no MFU
}

}  // namespace
}  // namespace ptk
