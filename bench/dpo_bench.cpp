// DPO training throughput, pairs/s, with a precomputed vs a live reference: same model, same data,
// same process, driven through the stage's real code (rl::DpoStage under core/train's Trainer, what
// `ptk dpo` runs), runs alternating live / precomputed. Prints figures; never fails on time.
//
// Per run: setup = DpoStage construction (prepare the pairs, load policy, and the live reference)
// + Trainer construction (set_rank: with precompute, the reference pass over every training pair
// and the cache write). Steps: metrics.jsonl's step_time_s (forward, backward, clip, AdamW), the first
// --warmup steps dropped. Precompute pays off after (setup_pre - setup_live) / (step_live - step_pre)
// optimizer steps; divided by the steps per epoch that is an epoch count independent of --pairs.
// Live runs also time the live reference's forward alone (DpoStage::ref_logps on the next
// micro-batches after training), to compare with the precompute pass's pairs/s.
//
//   ninja -C build-dpo dpo_bench && OMP_WAIT_POLICY=PASSIVE build-dpo/bench/dpo_bench [--shape tiny|large|both]
//       [--pairs N] [--steps S] [--mb 16] [--threads 1] [--repeats 1] [--warmup 2] [--workdir DIR]
// (OMP_WAIT_POLICY=PASSIVE as `ptk` sets for itself: spinning OpenMP threads on shared cores distort steps.)
// Shapes: tiny = recipes/tiny/model.json's (2 layers, hidden 128, byte tokenizer's 259 ids); large =
// 4 layers, hidden 256, Qwen2.5's 151,936-id vocabulary (the byte tokenizer uses 259 of them; the
// lm_head, embedding and AdamW still pay for all). Data: make-data's arithmetic preference pairs.
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "core/checkpoint/hf_config.h"
#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/runtime/runtime.h"
#include "core/train/from_recipe.h"
#include "core/train/trainer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/arithmetic.h"
#include "datasets/byte_tokenizer.h"
#include "rl/dpo_stage.h"
#include "bench/bench_util.h"

namespace ptk {
namespace {

namespace fs = std::filesystem;
using bench::Clock;
using bench::loadavg;
using bench::seconds_since;


// tiny: recipes/tiny/model.json itself; large: that shape scaled up to the real Qwen2.5 vocabulary.
checkpoint::Qwen2Config shape_config(const std::string& shape) {
  if (shape == "tiny") return checkpoint::read_config(bench::source_dir() + "/recipes/tiny/model.json");
  if (shape != "large") throw Error("--shape must be tiny, large or both, not " + shape);
  checkpoint::Qwen2Config c;
  c.max_position_embeddings = 512;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = true;
  c.eos_token_ids = {258};
  c.pad_token_id = 256;
  c.vocab_size = 151936;
  c.hidden_size = 256;
  c.intermediate_size = 1024;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  return c;
}

struct RunResult {
  double setup_s = 0, stage_s = 0, trainer_s = 0, run_s = 0;
  std::vector<double> step_s;  // after warm-up
  double tokens_per_pair = 0;
  int64_t steps_per_epoch = 0;
  double ref_alone_s = 0;  // live only: one reference forward of a micro-batch outside the step (mean)
  double mean_step() const { return std::accumulate(step_s.begin(), step_s.end(), 0.0) / step_s.size(); }
};

// step_time_s and tokens_per_s of every step in metrics.jsonl.
std::vector<std::pair<double, double>> read_step_times(const std::string& path) {
  std::vector<std::pair<double, double>> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    auto d = json::parse(line, path);
    if (d.HasMember("step_time_s") && d.HasMember("tokens_per_s"))
      out.emplace_back(d["step_time_s"].GetDouble(), d["tokens_per_s"].GetDouble());
  }
  return out;
}

RunResult run_once(const std::string& run_dir, const std::string& model_dir, const std::string& train_file,
                   bool precompute, int64_t steps, int64_t mb, int64_t warmup) {
  std::vector<std::string> ov{
      "run.seed=1234", "run.dir=\"" + run_dir + "\"", "model.path=\"" + model_dir + "\"",
      "data.train=[\"" + train_file + "\"]", "data.max_seq_len=256", "train.max_steps=" + std::to_string(steps),
      "train.micro_batch_size=" + std::to_string(mb), "train.grad_accum=1", "train.log_every=1000000",
      "optim.lr=3e-4", "optim.warmup_steps=0", "checkpoint.every=0", "resume=\"never\"",
      "dpo.loss_type=\"sigmoid\"", std::string("dpo.precompute_ref_log_probs=") + (precompute ? "true" : "false")};
  rl::DpoRecipe r;
  auto json = config::load_recipe("", ov);
  config::bind_recipe(json, r.all_sections());
  RunResult res;
  auto t0 = Clock::now();
  rl::DpoStage stage(r, run_dir);
  res.stage_s = seconds_since(t0);
  train::TrainerOptions options = train::trainer_options(r, run_dir, "", "dpo");
  options.peak_flops = 1e12;  // skip the start-up matmul measurement (MFU is not reported here)
  auto t1 = Clock::now();
  train::Trainer trainer(stage, options);
  res.trainer_s = seconds_since(t1);
  res.setup_s = seconds_since(t0);
  res.steps_per_epoch = stage.micro_batches_per_epoch();
  auto t2 = Clock::now();
  trainer.run();
  res.run_s = seconds_since(t2);
  auto st = read_step_times(run_dir + "/metrics.jsonl");
  PTK_CHECK(static_cast<int64_t>(st.size()) == steps,
            "expected " + std::to_string(steps) + " steps in metrics.jsonl, got " + std::to_string(st.size()));
  double tok = 0;
  for (size_t i = static_cast<size_t>(warmup); i < st.size(); ++i) {
    res.step_s.push_back(st[i].first);
    tok += st[i].first * st[i].second;
  }
  res.tokens_per_pair = tok / (res.step_s.size() * mb);
  if (!precompute) {
    // The live reference's forward by itself (no policy graph alive), on the next micro-batches:
    // what the step pays for it when nothing else competes for caches and memory.
    const int reps = 6;
    for (int i = 0; i < reps + 1; ++i) {
      train::MicroBatch m = stage.next_micro_batch();
      const auto& b = *static_cast<const rl::PairBatch*>(m.data.get());
      auto t = Clock::now();
      at::Tensor ref = stage.ref_logps(b);  // (P, 2), computed by the live reference
      if (i > 0) res.ref_alone_s += seconds_since(t) / reps;  // the first is a warm-up
    }
  }
  return res;
}

int run(int argc, char** argv) {
  std::string shape_arg = "tiny", workdir;
  int64_t pairs = -1, steps = -1, mb = 16, warmup = 2;
  int threads = 1, repeats = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--shape") shape_arg = next();
    else if (a == "--pairs") pairs = std::stoll(next());
    else if (a == "--steps") steps = std::stoll(next());
    else if (a == "--mb") mb = std::stoll(next());
    else if (a == "--threads") threads = std::stoi(next());
    else if (a == "--repeats") repeats = std::stoi(next());
    else if (a == "--warmup") warmup = std::stoll(next());
    else if (a == "--workdir") workdir = next();
    else throw Error("unknown flag " + a + " (see the top of bench/dpo_bench.cpp)");
  }
  std::vector<std::string> shapes;
  if (shape_arg == "both") shapes = {"tiny", "large"};
  else shapes = {shape_arg};
  runtime::init_and_announce(threads);
  const bool own_workdir = workdir.empty();
  if (own_workdir) workdir = (fs::temp_directory_path() / ("dpo_bench." + std::to_string(::getpid()))).string();
  make_dirs(workdir);

  for (const auto& shape : shapes) {
    const int64_t n_pairs = pairs > 0 ? pairs : (shape == "tiny" ? 1024 : 256);
    const int64_t n_steps = steps > 0 ? steps : (shape == "tiny" ? 24 : 10);
    PTK_CHECK(n_steps > warmup, "--steps must exceed --warmup");
    const std::string base = workdir + "/" + shape;
    // make-data's arithmetic pairs (what `ptk make-data arithmetic` writes), the byte tokenizer, and a
    // random-init model saved as the "SFT final" folder both policy and reference load.
    tasks::ArithmeticOptions ao;
    ao.seed = 0;
    ao.train = n_pairs;
    ao.eval = 16;
    tasks::write_arithmetic_dataset(base + "/data", ao);
    const std::string model_dir = base + "/sft-final";
    make_dirs(model_dir);
    tasks::write_byte_tokenizer(model_dir);
    auto cfg = shape_config(shape);
    {
      auto m = model::Qwen2Model::from_config(cfg, 7);
      checkpoint::SaveOptions so;
      so.source_dir = model_dir;
      m.save_pretrained(model_dir, so);
    }
    std::printf("\n== shape %s: %lld layers, hidden %lld, vocab %lld; %lld make-data arithmetic pairs, %lld pairs/step, "
                "%lld steps per run (first %lld dropped), %d thread(s), load %s\n",
                shape.c_str(), (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size, (long long)cfg.vocab_size,
                (long long)n_pairs, (long long)mb, (long long)n_steps, (long long)warmup, threads, loadavg().c_str());
    std::fflush(stdout);
    std::map<bool, std::vector<RunResult>> results;
    for (int rep = 0; rep < repeats; ++rep) {
      for (bool pre : {false, true}) {
        const std::string run_dir = base + "/run-" + (pre ? "pre" : "live") + "-" + std::to_string(rep);
        RunResult rr = run_once(run_dir, model_dir, base + "/data/preference_train.jsonl", pre, n_steps, mb, warmup);
        std::printf("  %-11s rep %d: setup %.2f s (stage %.2f + trainer %.2f), step %.3f s -> %.1f pairs/s "
                    "(%.0f tokens/pair, both rows), run %.1f s | load %s\n",
                    pre ? "precomputed" : "live", rep, rr.setup_s, rr.stage_s, rr.trainer_s, rr.mean_step(),
                    mb / rr.mean_step(), rr.tokens_per_pair, rr.run_s, loadavg().c_str());
        if (!pre)
          std::printf("              live reference forward alone: %.3f s per micro-batch (%.1f pairs/s)\n",
                      rr.ref_alone_s, mb / rr.ref_alone_s);
        std::fflush(stdout);
        results[pre].push_back(std::move(rr));
        fs::remove_all(run_dir);
      }
    }
    auto mean = [](const std::vector<RunResult>& v, double RunResult::*f) {
      double s = 0;
      for (auto& x : v) s += x.*f;
      return s / v.size();
    };
    auto mean_step = [](const std::vector<RunResult>& v) {
      double s = 0;
      for (auto& x : v) s += x.mean_step();
      return s / v.size();
    };
    const double live_step = mean_step(results[false]), pre_step = mean_step(results[true]);
    const double live_setup = mean(results[false], &RunResult::setup_s), pre_setup = mean(results[true], &RunResult::setup_s);
    const double pass_s = pre_setup - live_setup;  // the reference pass + cache write, beyond the live setup
    const int64_t spe = results[true][0].steps_per_epoch;
    std::printf("  summary %s: live %.1f pairs/s, precomputed %.1f pairs/s (x%.2f); precompute pass ~%.2f s "
                "(setup %.2f vs %.2f s; %.1f pairs/s over %lld pairs)\n",
                shape.c_str(), mb / live_step, mb / pre_step, live_step / pre_step, pass_s, pre_setup, live_setup,
                n_pairs / pass_s, (long long)n_pairs);
    if (live_step > pre_step) {
      const double payoff_steps = pass_s / (live_step - pre_step);
      std::printf("  precompute pays off after %.1f optimizer steps = %.2f epochs (%lld steps of %lld pairs per epoch)\n",
                  payoff_steps, payoff_steps / spe, (long long)spe, (long long)mb);
    } else {
      std::printf("  precomputed steps were not faster than live ones here: precompute does not pay off in time\n");
    }
    std::printf("  load after: %s\n", loadavg().c_str());
    std::fflush(stdout);
  }
  if (own_workdir) fs::remove_all(workdir);
  return 0;
}

}  // namespace
}  // namespace ptk

int main(int argc, char** argv) {
  try {
    return ptk::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dpo_bench: %s\n", e.what());
    return 1;
  }
}
