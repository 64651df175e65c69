#include "core/train/trainer.h"

#include <ATen/Parallel.h>
#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <mutex>

#include "core/checkpoint/checkpoint.h"
#include "core/optim/clip.h"
#include "core/optim/schedule.h"
#include "core/runtime/log.h"
#include "core/runtime/runtime.h"
#include "core/train/checkpoint_dir.h"
#include "core/train/progress.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "core/util/strings.h"

namespace ptk::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::vector<at::Tensor> tensors_of(const optim::NamedTensors& named) {
  std::vector<at::Tensor> out;
  for (auto& [n, t] : named) out.push_back(t);
  return out;
}

}  // namespace

void load_weights_into(const optim::NamedTensors& params, const std::string& dir) {
  auto tensors = checkpoint::read_checkpoint_tensors(dir);
  torch::NoGradGuard ng;
  for (auto& [name, p] : params) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      // Tied checkpoints store no lm_head.
      throw Error(dir + ": checkpoint has no tensor " + name);
    }
    if (it->second.sizes() != p.sizes())
      throw Error(dir + ": tensor " + name + " has shape " + c10::str(it->second.sizes()) + ", the model needs " +
                  c10::str(p.sizes()));
    p.detach().copy_(it->second);
  }
}

double measure_matmul_flops() {
  torch::NoGradGuard ng;
  const int64_t n = 1024;
  auto a = torch::randn({n, n}, torch::TensorOptions().dtype(torch::kFloat32));
  auto b = torch::randn({n, n});
  torch::mm(a, b);
  int iters = 0;
  auto t0 = Clock::now();
  while (seconds_since(t0) < 0.3 || iters < 2) {
    torch::mm(a, b);
    ++iters;
  }
  return 2.0 * n * n * n * iters / seconds_since(t0);
}

struct Trainer::Impl {
  Stage& stage;
  TrainerOptions opt;
  optim::NamedTensors params;
  std::unique_ptr<optim::AdamW> adamw;
  optim::Schedule schedule;
  optim::NanGuard guard;
  int64_t step = 0;
  int64_t micro_batches_done = 0;  // consumed from the stream, all epochs
  int64_t total_steps = 0;
  int64_t total_micro_batches = -1;  // -1: unbounded (max_steps set)
  int64_t tokens_seen = 0;

  Impl(Stage& s, TrainerOptions o) : stage(s), opt(std::move(o)), guard(opt.max_bad_steps) {
    params = stage.parameters();
    adamw = std::make_unique<optim::AdamW>(params, opt.adamw);
    int64_t mbpe = stage.micro_batches_per_epoch();
    PTK_CHECK(mbpe > 0, "the training data has no micro-batches (empty dataset?)");
    if (opt.max_steps > 0) {
      total_steps = opt.max_steps;
    } else {
      total_micro_batches = opt.epochs * mbpe;
      total_steps = (total_micro_batches + opt.grad_accum - 1) / opt.grad_accum;
    }
    schedule = optim::Schedule{opt.schedule, opt.lr, opt.min_lr, opt.warmup_steps, total_steps};
  }

  std::string ckpt_root() const { return opt.run_dir + "/checkpoints"; }

  void save_checkpoint() {
    CheckpointDir dir(ckpt_root(), opt.keep_last);
    std::string tmp = dir.begin(step);
    stage.save_model(tmp + "/model.tmp");
    // save_model writes an HF folder; move its files up so step-N/ is itself the HF folder.
    for (auto& e : std::filesystem::directory_iterator(tmp + "/model.tmp"))
      std::filesystem::rename(e.path(), tmp + "/" + e.path().filename().string());
    std::filesystem::remove(tmp + "/model.tmp");
    std::string ts = tmp + "/trainer_state";
    make_dirs(ts);
    checkpoint::write_safetensors(ts + "/optimizer.safetensors", adamw->state());
    at::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
    checkpoint::write_safetensors(ts + "/rng.safetensors", {{"torch_cpu", rng}});
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    w.StartObject();
    w.Key("step");
    w.Int64(step);
    w.Key("optimizer_steps");
    w.Int64(adamw->steps());
    w.Key("micro_batches_done");
    w.Int64(micro_batches_done);
    w.Key("tokens_seen");
    w.Int64(tokens_seen);
    w.Key("skipped_steps");
    w.Int64(guard.skipped_total());
    w.Key("threads");
    w.Int(at::get_num_threads());
    w.Key("seed");
    w.Int64(opt.seed);
    w.Key("cursor");
    w.RawValue(stage.cursor_json().c_str(), stage.cursor_json().size(), rapidjson::kObjectType);
    w.EndObject();
    write_file_atomic(ts + "/state.json", std::string(buf.GetString(), buf.GetSize()) + "\n");
    write_file_atomic(ts + "/recipe.json", opt.resolved_recipe);
    dir.commit(step);
  }

  // Returns the checkpoint resumed from, or "".
  std::string resume() {
    std::string from;
    if (opt.resume == "never") return "";
    if (opt.resume == "auto") {
      from = CheckpointDir(ckpt_root(), opt.keep_last).latest();
      if (from.empty()) return "";
    } else {
      from = opt.resume;
      if (!CheckpointDir::is_complete(from))
        throw Error("resume=" + from + " is not a complete checkpoint folder (no DONE marker)\n"
                    "---> HINT: resume=auto picks the newest complete one in " + ckpt_root());
    }
    std::string ts = from + "/trainer_state";
    auto state = json::parse_file(ts + "/state.json");
    load_weights_into(params, from);
    auto opt_state = checkpoint::read_safetensors(ts + "/optimizer.safetensors");
    optim::NamedTensors named(opt_state.begin(), opt_state.end());
    adamw->load_state(named, state["optimizer_steps"].GetInt64());
    auto rng = checkpoint::read_safetensors(ts + "/rng.safetensors");
    at::Generator gen = at::detail::getDefaultCPUGenerator();  // a handle to the global generator
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng.at("torch_cpu").clone());
    }
    step = state["step"].GetInt64();
    micro_batches_done = state["micro_batches_done"].GetInt64();
    tokens_seen = state["tokens_seen"].GetInt64();
    stage.restore_cursor(json::to_string(state["cursor"]));
    int saved_threads = state["threads"].GetInt();
    if (saved_threads != at::get_num_threads())
      log::warn("checkpoint " + from + " was written with " + std::to_string(saved_threads) +
                " threads, this run has " + std::to_string(at::get_num_threads()) +
                ": resume continues, but not bit-for-bit (CPU reductions split work by thread). "
                "Use --threads " + std::to_string(saved_threads) + " for an exact resume.");
    log::info("resumed from " + from + " at step " + std::to_string(step));
    return from;
  }

  void write_final() {
    std::string tmp = opt.run_dir + "/final.tmp";
    std::error_code ec;
    std::filesystem::remove_all(tmp, ec);
    stage.save_model(tmp);
    replace_dir_atomic(tmp, opt.run_dir + "/final");
  }
};

Trainer::Trainer(Stage& stage, TrainerOptions options) : impl_(std::make_unique<Impl>(stage, std::move(options))) {}
Trainer::~Trainer() = default;
int64_t Trainer::step() const { return impl_->step; }
int64_t Trainer::total_steps() const { return impl_->total_steps; }
const optim::AdamW& Trainer::optimizer() const { return *impl_->adamw; }

int64_t Trainer::run() {
  Impl& s = *impl_;
  const TrainerOptions& o = s.opt;
  make_dirs(o.run_dir);
  if (!o.resolved_recipe.empty()) write_file_atomic(o.run_dir + "/config.json", o.resolved_recipe);
  s.resume();
  MetricsWriter metrics(o.run_dir + "/metrics.jsonl", s.step);
  double peak = o.peak_flops > 0 ? o.peak_flops : (s.stage.flops_per_token() > 0 ? measure_matmul_flops() : 0);
  const double flops_per_token = s.stage.flops_per_token();
  const int64_t start_step = s.step;
  const int64_t mbpe = s.stage.micro_batches_per_epoch();
  Progress progress(o.label, s.total_steps, "steps", 10.0);
  progress.update(s.step);
  std::vector<at::Tensor> param_tensors = tensors_of(s.params);
  while (s.step < s.total_steps) {
    auto t0 = Clock::now();
    // Fetch the step's micro-batches first: the loss is normalized by their total target count.
    std::vector<MicroBatch> mbs;
    for (int64_t k = 0; k < o.grad_accum; ++k) {
      if (s.total_micro_batches >= 0 && s.micro_batches_done >= s.total_micro_batches) break;
      mbs.push_back(s.stage.next_micro_batch());
      ++s.micro_batches_done;
    }
    if (mbs.empty()) break;
    int64_t n_targets = 0, n_tokens = 0;
    for (auto& mb : mbs) {
      n_targets += mb.targets;
      n_tokens += mb.tokens;
    }
    double loss_sum = 0;
    std::vector<std::pair<std::string, double>> sums;
    std::vector<int> counts;
    for (auto& mb : mbs) {
      LossOut out = s.stage.loss(mb, static_cast<double>(std::max<int64_t>(n_targets, 1)));
      out.loss.backward();
      loss_sum += out.loss.item<double>();
      for (auto& [k, v] : out.metrics.values()) {
        size_t i = 0;
        while (i < sums.size() && sums[i].first != k) ++i;
        if (i == sums.size()) {
          sums.emplace_back(k, 0.0);
          counts.push_back(0);
        }
        if (std::isfinite(v)) {
          sums[i].second += v;
          ++counts[i];
        }
      }
    }
    double lr = s.schedule.lr_at(s.step);
    double norm = optim::clip_grad_norm(param_tensors, o.clip_grad_norm);
    bool ok = s.guard.check(norm, s.step + 1);
    if (ok) s.adamw->step(lr);
    s.adamw->zero_grad();
    ++s.step;
    s.tokens_seen += n_tokens;
    double dt = seconds_since(t0);
    Metrics m;
    m.add("loss", loss_sum).add("lr", lr).add("learning_rate", lr).add("grad_norm", norm);
    m.add("tokens_per_s", n_tokens / dt);
    if (flops_per_token > 0 && peak > 0) m.add("mfu", flops_per_token * n_tokens / dt / peak);
    m.add("step_time_s", dt).add("peak_rss_bytes", static_cast<double>(runtime::peak_rss_bytes()));
    m.add("num_tokens", static_cast<double>(s.tokens_seen));
    m.add("epoch", static_cast<double>(s.micro_batches_done) / mbpe);
    if (!ok) m.add("skipped_step", 1);
    for (size_t i = 0; i < sums.size(); ++i)
      m.add(sums[i].first, counts[i] ? sums[i].second / counts[i] : std::nan(""));
    bool last = s.step == s.total_steps ||
                (s.total_micro_batches >= 0 && s.micro_batches_done >= s.total_micro_batches);
    if ((o.eval_every > 0 && s.step % o.eval_every == 0) || last) {
      Metrics e;
      s.stage.evaluate(&e);
      for (auto& [k, v] : e.values()) m.add("eval/" + k, v);
    }
    metrics.write(s.step, m);
    if (s.step % o.log_every == 0 || last) {
      char extra[160];
      std::snprintf(extra, sizeof extra, "loss %.4f | lr %.3g | grad_norm %.3f | %.0f tok/s", loss_sum, lr, norm,
                    n_tokens / dt);
      progress.update(s.step, extra);
    }
    if (o.checkpoint_every > 0 && s.step % o.checkpoint_every == 0) s.save_checkpoint();
    if (last) break;
  }
  progress.finish();
  s.write_final();
  log::info("wrote " + o.run_dir + "/final (step " + std::to_string(s.step) + ")");
  return s.step - start_step;
}

}  // namespace ptk::train
