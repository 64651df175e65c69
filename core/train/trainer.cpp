#include "core/train/trainer.h"

#include <ATen/Parallel.h>
#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <filesystem>
#include <iostream>
#include <cstring>
#include <mutex>

#include "core/checkpoint/checkpoint.h"
#include "core/parallel/grad_sync.h"
#include "core/optim/zero1.h"
#include "core/optim/zero2.h"
#include "core/optim/clip.h"
#include "core/optim/schedule.h"
#include "core/runtime/device.h"
#include "core/runtime/device_memory.h"
#include "core/runtime/log.h"
#include "core/runtime/runtime.h"
#include "core/train/checkpoint_dir.h"
#include "core/train/device_peak.h"
#include "core/train/peak_flops.h"
#include "core/train/plot.h"
#include "core/train/progress.h"
#include "core/train/rerun.h"
#include "core/train/rng_state.h"
#include "core/train/run_folder.h"
#include "core/train/stage_view.h"
#include "core/train/tensorboard.h"
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

// Fails on every rank when ranks disagree on `value` (a count, a hash): the collectives that
// follow would otherwise mismatch or hang.
void check_same_on_all_ranks(parallel::Comm& comm, int64_t value, const std::string& what, const std::string& hint) {
  if (comm.world_size() == 1) return;
  auto t = at::tensor({value, -value}, at::kLong);
  comm.all_reduce(t, parallel::ReduceOp::kMax);
  int64_t hi = t[0].item<int64_t>(), lo = -t[1].item<int64_t>();
  if (hi != lo)
    throw Error("data parallel: ranks disagree on " + what + " (rank " + std::to_string(comm.rank()) + " has " +
                std::to_string(value) + ", others range " + std::to_string(lo) + ".." + std::to_string(hi) +
                ")\n---> HINT: " + hint);
}

int64_t hash_of(const std::string& s) { return static_cast<int64_t>(std::hash<std::string>{}(s) >> 2); }

// The device scalars of one optimizer step — each micro-batch's loss, the stage's tensor metrics and
// tensor ratios, the gradient norm — kept (detached) until read() copies them to the host as one
// stacked float64 tensor: the step's only synchronisation with the device. The host then adds them
// up exactly as it adds the stages' double metrics (so a CPU run logs the same bits as when every
// value was read with .item() at once).
class StepReads {
 public:
  void add_loss(const at::Tensor& loss) { losses_.push_back(scalar(loss, "the loss")); }
  void add_metric(size_t index, const std::string& name, const at::Tensor& value) {
    metrics_.push_back({index, 0, scalar(value, "tensor metric " + name)});
  }
  void add_ratio(size_t index, size_t micro_batch, const std::string& name, const at::Tensor& num,
                 const at::Tensor& den) {
    ratios_.push_back({index, micro_batch, scalar(num, "tensor ratio " + name + " (numerator)")});
    ratios_.push_back({index, micro_batch, scalar(den, "tensor ratio " + name + " (denominator)")});
  }
  // Reads everything with `norm` (the gradient norm): loss_sum = the losses' sum, metrics added to
  // sums/counts where finite, ratios into ratio_nd[index][2 * micro_batch (+ 1)].
  void read(const at::Tensor& norm, double* loss_sum, double* norm_out, std::vector<std::pair<std::string, double>>* sums,
            std::vector<int>* counts, std::vector<std::vector<double>>* ratio_nd) const {
    const at::Device dev = losses_.empty() ? norm.device() : losses_.front().device();
    std::vector<at::Tensor> parts{norm.detach().reshape({}).to(dev, at::kDouble)};
    for (const auto& l : losses_) parts.push_back(l.to(dev, at::kDouble));
    for (const auto& e : metrics_) parts.push_back(e.value.to(dev, at::kDouble));
    for (const auto& e : ratios_) parts.push_back(e.value.to(dev, at::kDouble));
    const at::Tensor host = at::stack(parts).to(at::kCPU);  // the one synchronisation of the step
    const double* h = host.data_ptr<double>();
    size_t at = 0;
    *norm_out = h[at++];
    for (size_t i = 0; i < losses_.size(); ++i) *loss_sum += h[at++];
    for (const auto& e : metrics_) {
      const double v = h[at++];
      if (!std::isfinite(v)) continue;
      (*sums)[e.index].second += v;
      ++(*counts)[e.index];
    }
    for (size_t i = 0; i < ratios_.size(); i += 2) {
      (*ratio_nd)[ratios_[i].index][2 * ratios_[i].micro_batch] = h[at++];
      (*ratio_nd)[ratios_[i].index][2 * ratios_[i].micro_batch + 1] = h[at++];
    }
  }

 private:
  struct Entry {
    size_t index, micro_batch;
    at::Tensor value;
  };
  static at::Tensor scalar(const at::Tensor& t, const std::string& what) {
    if (!t.defined() || t.numel() != 1)
      throw Error("the stage's " + what + " is " + (t.defined() ? "a tensor of " + std::to_string(t.numel()) +
                  " elements" : std::string("undefined")) + "; one value is expected\n---> HINT: reduce it to a "
                  "0-dim tensor (.sum(), .mean()) in Stage::loss");
    return t.detach().reshape({});
  }
  std::vector<at::Tensor> losses_;
  std::vector<Entry> metrics_, ratios_;
};

}  // namespace

void Stage::set_rank(int rank, int world_size) {
  if (world_size != 1)
    throw Error("this stage does not split its data across ranks (world size " + std::to_string(world_size) +
                "): every rank would train on the same data\n---> HINT: run it with one rank, or give the stage "
                "a set_rank() that shards its loader");
}

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
  // The best single 2048^3 product over about a second: the GEMM rate this process can reach when
  // the machine lets it. The mean of 1024^3 products over 0.3 s (before 2026-11-28) ran below the
  // training step's own GEMMs on a shared machine (2048^3 reaches more than 1024^3 on 2 threads),
  // and `ptk sft` at 0.5B reported an MFU of 108.8%.
  torch::NoGradGuard ng;
  const int64_t n = 2048;
  auto a = torch::randn({n, n}, torch::TensorOptions().dtype(torch::kFloat32));
  auto b = torch::randn({n, n});
  auto c = torch::mm(a, b);
  double best = 1e30;
  int iters = 0;
  auto t0 = Clock::now();
  while (seconds_since(t0) < 1.0 || iters < 3) {
    auto t = Clock::now();
    torch::mm_out(c, a, b);
    best = std::min(best, seconds_since(t));
    ++iters;
  }
  return 2.0 * n * n * n / best;
}

std::string sharding_mode(const TrainerOptions& o) {
  if (o.sharding != "none" && o.sharding != "zero1" && o.sharding != "zero2")
    throw Error("train.sharding = `" + o.sharding + "` is not a sharding mode: none | zero1 | zero2");
  if (o.zero1 && o.sharding == "zero2")
    throw Error("train.zero1=true (the older spelling of train.sharding=zero1) conflicts with train.sharding=" +
                o.sharding + "\n---> HINT: drop train.zero1, or set train.sharding=zero1");
  return o.zero1 ? "zero1" : o.sharding;
}

double training_state_bytes(const optim::NamedTensors& params, int world_size, const std::string& sharding) {
  double weights = 0, grads = 0, optimizer = 0;
  for (const auto& [name, p] : params) {
    double n = static_cast<double>(p.numel());
    weights += n * p.element_size();
    grads += n * p.element_size();
    optimizer += n * (8 + (p.scalar_type() == torch::kFloat32 ? 0 : 4));    // moments (+ fp32 master)
  }
  const double w = std::max(1, world_size);
  if (sharding == "zero2") grads /= w;
  if (sharding == "zero1" || sharding == "zero2") optimizer /= w;
  return weights + grads + optimizer;
}

double training_state_bytes(const optim::NamedTensors& params, int world_size, bool zero1) {
  return training_state_bytes(params, world_size, std::string(zero1 ? "zero1" : "none"));
}

struct Trainer::Impl {
  Stage& stage;
  TrainerOptions opt;
  parallel::Comm comm;
  optim::NamedTensors params;
  std::unique_ptr<optim::AdamW> adamw;      // without ZeRO-1
  std::unique_ptr<optim::Zero1AdamW> zero1;  // with ZeRO-1
  std::unique_ptr<optim::Zero2AdamW> zero2;  // with ZeRO-2 (it reduce-scatters the gradients itself)
  std::unique_ptr<parallel::GradSync> grad_sync;  // world size > 1, without ZeRO-2
  std::string sharding;                           // sharding_mode(opt): none | zero1 | zero2
  optim::Schedule schedule;
  optim::NanGuard guard;
  int64_t step = 0;
  int64_t micro_batches_done = 0;  // consumed from the stream, all epochs (this rank)
  int64_t total_steps = 0;
  int64_t total_micro_batches = -1;  // -1: unbounded (max_steps set)
  int64_t tokens_seen = 0;           // all ranks
  StageView view;                    // what the progress line, eval lines, summary and report.md show
  int64_t run_start_step = 0;        // where this process began (after resume)
  Clock::time_point run_start = Clock::now();

  Impl(Stage& s, TrainerOptions o)
      : stage(s), opt(std::move(o)), comm(opt.comm), guard(opt.max_bad_steps), view(stage_view(opt.label)) {
    sharding = sharding_mode(opt);
    stage.set_rank(comm.rank(), comm.world_size());
    params = stage.parameters();
    check_memory();
    if (comm.world_size() > 1) {
      check_same_on_all_ranks(comm, static_cast<int64_t>(params.size()), "the number of parameters",
                              "every rank must build the same model");
      // Every rank starts from rank 0's weights (as DDP does), whatever its own initialisation.
      torch::NoGradGuard ng;
      for (auto& [name, p] : params) {
        at::Tensor buf = p.detach().contiguous();
        comm.broadcast(buf, 0);
        if (!buf.is_same(p)) p.detach().copy_(buf);
      }
    }
    if (sharding == "zero1") zero1 = std::make_unique<optim::Zero1AdamW>(comm, params, opt.adamw);
    else if (sharding == "zero2") zero2 = std::make_unique<optim::Zero2AdamW>(comm, params, opt.adamw, opt.bucket_mb);
    else adamw = std::make_unique<optim::AdamW>(params, opt.adamw);
    if (comm.world_size() > 1 && !zero2) grad_sync = std::make_unique<parallel::GradSync>(comm, params, opt.bucket_mb);
    int64_t mbpe = stage.micro_batches_per_epoch();
    PTK_CHECK(mbpe > 0, "the training data has no micro-batches (empty dataset?)");
    check_same_on_all_ranks(comm, mbpe, "the number of micro-batches per epoch",
                            "the loader must give every rank the same number of micro-batches (drop the "
                            "remainder or pad), else ranks would run different numbers of steps");
    PTK_CHECK(opt.max_steps == -1 || opt.max_steps > 0,
              "TrainerOptions::max_steps must be -1 (from epochs) or >= 1, got " + std::to_string(opt.max_steps));
    if (opt.max_steps > 0) {
      total_steps = opt.max_steps;
    } else {
      total_micro_batches = opt.epochs * mbpe;
      total_steps = (total_micro_batches + opt.grad_accum - 1) / opt.grad_accum;
    }
    schedule = optim::Schedule{opt.schedule, opt.lr, opt.min_lr, opt.warmup_steps, total_steps};
    if (main() && opt.warmup_steps > 0 && opt.warmup_steps >= total_steps) {
      char msg[512];
      std::snprintf(msg, sizeof msg,
                    "optim.warmup_steps=%lld is not shorter than this run's %lld optimizer steps: the learning rate "
                    "never reaches optim.lr=%g (the last step uses %.3g)\n---> HINT: lower optim.warmup_steps; "
                    "TRL's warmup_ratio=0.1 would be %lld steps here",
                    static_cast<long long>(opt.warmup_steps), static_cast<long long>(total_steps), opt.lr,
                    schedule.lr_at(total_steps - 1), static_cast<long long>(std::ceil(0.1 * total_steps)));
      log::warn(msg);
    }
  }

  bool main() const { return comm.rank() == 0; }
  // Where the parameters are (the first one's device; cpu without parameters).
  at::Device device() const { return params.empty() ? at::Device(at::kCPU) : params.front().second.device(); }
  void check_memory() const {
    double budget = opt.memory_budget_bytes;
    if (budget <= 0 && device().is_cuda()) {
      // The device's free memory (with what LibTorch's cache holds unused) plus what the parameters
      // already take there: the training state's weights are counted in the estimate below.
      size_t free_bytes = 0, total = 0;
      if (!runtime::cuda_free_memory(device().index(), &free_bytes, &total)) return;  // unknown: unchecked
      double held = 0;
      for (const auto& [name, p] : params)
        if (p.device() == device()) held += static_cast<double>(p.numel()) * p.element_size();
      held += stage.frozen_bytes();  // a frozen LoRA base is on the device too, and in the estimate
      budget = static_cast<double>(free_bytes) + held;
    }
    if (budget <= 0) {
      long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
      int local = std::max(1, static_cast<int>(comm.world_size()));
      if (const char* lws = std::getenv("LOCAL_WORLD_SIZE")) local = std::max(1, std::atoi(lws));
      budget = static_cast<double>(pages) * page / local;
    }
    double need = training_state_bytes(params, comm.world_size(), sharding) + stage.frozen_bytes();
    int64_t n = 0;
    for (const auto& [name, p] : params) n += p.numel();
    if (need > budget && stage.frozen_bytes() > 0)
      throw Error("a frozen base of " + format_bytes(stage.frozen_bytes()) + " and " + std::to_string(n) +
                  " trained LoRA parameters with their gradients and AdamW state need " + format_bytes(need) +
                  " per rank (activations not counted), more than the " + format_bytes(budget) +
                  " available.\n---> HINT: every rank holds the whole base (ZeRO-1 does not shard it): use a smaller "
                  "model or a device with more memory; weight sharding and 4-bit bases (QLoRA) are not implemented yet.");
    if (need > budget)
      throw Error("this model has " + std::to_string(n / 1000000) + "M parameters: weights, gradients and AdamW state need " +
                  format_bytes(need) + " per rank (activations not counted), more than the " + format_bytes(budget) +
                  " available (train.sharding=" + sharding +
                  ").\n---> HINT: use more ranks with train.sharding=zero2 (or zero1), a smaller model, or a machine "
                  "with more memory; sharding of the weights themselves (needed for 14B-72B) is not implemented yet.");
  }

  std::string ckpt_root() const { return opt.run_dir + "/checkpoints"; }
  std::string rank_file(const std::string& stem, const std::string& ext) const {
    return stem + "-rank-" + std::to_string(comm.rank()) + ext;
  }

  int64_t optimizer_steps() const { return zero1 ? zero1->steps() : zero2 ? zero2->steps() : adamw->steps(); }
  void optimizer_step(double lr) {
    if (zero1) zero1->step(lr);
    else if (zero2) zero2->step(lr);
    else adamw->step(lr);
  }
  void zero_grad() {
    if (zero1) zero1->zero_grad();
    else if (zero2) zero2->zero_grad();
    else adamw->zero_grad();
  }

  // Rank 0 writes the model, state.json and (without ZeRO) the optimizer; with ZeRO-1 or ZeRO-2 every
  // rank writes its optimizer shard, and ranks > 0 their RNG and data cursor. Rank 0 commits last.
  // A failed write (a full disk, say) removes its partial temporary folder on rank 0, so that the
  // space comes back and the next run starts clean; the error goes on.
  void save_checkpoint() {
    std::unique_ptr<CheckpointDir> dir;
    if (main()) dir = std::make_unique<CheckpointDir>(ckpt_root(), opt.keep_last);
    try {
      write_checkpoint(dir.get());
    } catch (...) {
      if (dir) checkpoint::discard_partial_write(dir->temporary(step), "checkpoint step-" + std::to_string(step));
      throw;
    }
  }

  // The files of save_checkpoint(); `dir` is rank 0's (nullptr on the other ranks).
  void write_checkpoint(CheckpointDir* dir) {
    std::string tmp;
    if (dir) {
      tmp = dir->begin(step);
      stage.save_model(tmp + "/model.tmp");
      // save_model writes an HF folder; move its files up so step-N/ is itself the HF folder.
      for (auto& e : std::filesystem::directory_iterator(tmp + "/model.tmp"))
        std::filesystem::rename(e.path(), tmp + "/" + e.path().filename().string());
      std::filesystem::remove(tmp + "/model.tmp");
      make_dirs(tmp + "/trainer_state");
    }
    tmp = comm.broadcast(tmp, 0);  // also: the folder exists now
    std::string ts = tmp + "/trainer_state";
    const auto rng = rng_state(device());  // torch_cpu, and torch_cuda on a GPU
    if (zero1) checkpoint::write_safetensors(ts + "/" + rank_file("optimizer", ".safetensors"), zero1->state());
    if (zero2) checkpoint::write_safetensors(ts + "/" + rank_file("optimizer", ".safetensors"), zero2->state());
    if (!main()) {
      checkpoint::write_safetensors(ts + "/" + rank_file("rng", ".safetensors"), rng);
      write_file_atomic(ts + "/" + rank_file("cursor", ".json"), "{\"cursor\":" + stage.cursor_json() + "}\n");
    } else {
      if (adamw) checkpoint::write_safetensors(ts + "/optimizer.safetensors", adamw->state());
      checkpoint::write_safetensors(ts + "/rng.safetensors", rng);
      rapidjson::StringBuffer buf;
      rapidjson::Writer<rapidjson::StringBuffer> w(buf);
      w.StartObject();
      w.Key("step");
      w.Int64(step);
      w.Key("optimizer_steps");
      w.Int64(optimizer_steps());
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
      w.Key("world_size");
      w.Int(comm.world_size());
      w.Key("zero1");
      w.Bool(sharding == "zero1");
      w.Key("sharding");
      w.String(sharding.c_str());
      w.Key("cursor");
      w.RawValue(stage.cursor_json().c_str(), stage.cursor_json().size(), rapidjson::kObjectType);
      w.EndObject();
      write_file_atomic(ts + "/state.json", std::string(buf.GetString(), buf.GetSize()) + "\n");
      write_file_atomic(ts + "/recipe.json", opt.resolved_recipe);
    }
    comm.barrier();  // every rank's files are written
    if (dir) dir->commit(step);
    comm.barrier();  // nobody looks for this checkpoint before it is complete
  }

  // Returns the checkpoint resumed from, or "". Every rank resumes from the same one.
  std::string resume() {
    std::string from;
    if (opt.resume == "never") return "";
    if (opt.resume == "auto") {
      from = CheckpointDir(ckpt_root(), opt.keep_last).latest();
    } else {
      from = opt.resume;
      if (!CheckpointDir::is_complete(from))
        throw Error("resume=" + from + " is not a complete checkpoint folder (no DONE marker)\n"
                    "---> HINT: resume=auto picks the newest complete one in " + ckpt_root());
    }
    check_same_on_all_ranks(comm, hash_of(from), "the checkpoint to resume from (" + (from.empty() ? "none" : from) + ")",
                            "all ranks must see the same run folder (a shared file system)");
    if (from.empty()) return "";
    std::string ts = from + "/trainer_state";
    auto state = json::parse_file(ts + "/state.json");
    const int saved_world = state.HasMember("world_size") ? state["world_size"].GetInt() : 1;
    const bool saved_zero1 = state.HasMember("zero1") && state["zero1"].GetBool();
    // Checkpoints from before train.sharding have only "zero1".
    const std::string saved_sharding = state.HasMember("sharding") ? std::string(state["sharding"].GetString())
                                                                   : saved_zero1 ? "zero1" : "none";
    const int world = comm.world_size();
    auto spelled = [](const std::string& mode) {
      return "train.sharding=" + mode + (mode == "zero1" ? " (train.zero1=true)" : mode == "none" ? " (train.zero1=false)" : "");
    };
    if (saved_sharding != sharding)
      throw Error("checkpoint " + from + " was written with " + spelled(saved_sharding) + ", this run has " +
                  spelled(sharding) + ": its optimizer state is laid out differently\n---> HINT: resume with " +
                  spelled(saved_sharding) +
                  (saved_sharding != "none" ? " and " + std::to_string(saved_world) + " ranks" : std::string()) +
                  ", or resume=never to start over");
    if (sharding != "none" && saved_world != world)
      throw Error("checkpoint " + from + " holds " + (sharding == "zero1" ? "ZeRO-1" : "ZeRO-2") +
                  " optimizer shards for " + std::to_string(saved_world) +
                  " ranks, this run has " + std::to_string(world) +
                  " ranks; the shards cannot be re-cut\n---> HINT: resume with `ptk launch -n " +
                  std::to_string(saved_world) + "` (WORLD_SIZE=" + std::to_string(saved_world) +
                  "), or load its weights with model.path=" + from + " and resume=never (fresh optimizer)");
    load_weights_into(params, from);
    if (zero1 || zero2) {
      std::string f = ts + "/" + rank_file("optimizer", ".safetensors");
      if (!path_exists(f)) throw Error("checkpoint " + from + " has no " + rank_file("optimizer", ".safetensors"));
      auto shard = checkpoint::read_safetensors(f);
      const optim::NamedTensors named(shard.begin(), shard.end());
      if (zero1) zero1->load_state(named, state["optimizer_steps"].GetInt64());
      else zero2->load_state(named, state["optimizer_steps"].GetInt64());
    } else {
      auto opt_state = checkpoint::read_safetensors(ts + "/optimizer.safetensors");
      adamw->load_state(optim::NamedTensors(opt_state.begin(), opt_state.end()), state["optimizer_steps"].GetInt64());
    }
    // This rank's RNG and data cursor (rank 0's when the world size changed: the data order then differs).
    std::string rng_file = ts + "/rng.safetensors";
    std::string cursor = json::to_string(state["cursor"]);
    if (!main()) {
      if (saved_world == world) {
        rng_file = ts + "/" + rank_file("rng", ".safetensors");
        cursor = json::to_string(json::parse_file(ts + "/" + rank_file("cursor", ".json"))["cursor"]);
      } else {
        log::warn("checkpoint " + from + " was written by " + std::to_string(saved_world) + " ranks, this run has " +
                  std::to_string(world) + ": every rank restores rank 0's data cursor, so the data order differs "
                  "from the original run");
      }
    }
    const std::string rng_note = restore_rng_state(checkpoint::read_safetensors(rng_file), device(), rng_file);
    if (!rng_note.empty() && main()) log::info(rng_note);
    step = state["step"].GetInt64();
    micro_batches_done = state["micro_batches_done"].GetInt64();
    tokens_seen = state["tokens_seen"].GetInt64();
    stage.restore_cursor(cursor);
    int saved_threads = state["threads"].GetInt();
    if (saved_threads != at::get_num_threads())
      log::warn("checkpoint " + from + " was written with " + std::to_string(saved_threads) +
                " threads, this run has " + std::to_string(at::get_num_threads()) +
                ": resume continues, but not bit-for-bit (CPU reductions split work by thread). "
                "Use --threads " + std::to_string(saved_threads) + " for an exact resume.");
    if (main()) log::info("resumed from " + from + " at step " + std::to_string(step));
    return from;
  }

  RunFacts facts() const {
    RunFacts f;
    f.label = opt.label;
    f.run_dir = opt.run_dir;
    f.step = step;
    f.total_steps = total_steps;
    f.start_step = run_start_step;
    f.wall_s = seconds_since(run_start);
    f.tensorboard = opt.tensorboard;
    return f;
  }

  // report.md: what ran, the summary, the eval results and the stage's metrics every N steps as
  // tables, and the stage's curves (SVG beside it in plots/). Returns the end-of-run summary.
  std::string write_report() const {
    const RunFacts f = facts();
    const plot::MetricsLog log = plot::read_metrics(opt.run_dir + "/metrics.jsonl", opt.label);
    const Metrics before = read_eval_start(opt.run_dir);
    write_file_atomic(opt.run_dir + "/report.md", stage_report(f, view, log, before, opt.report_metrics));
    return run_summary(f, view, log, before);
  }

  void write_final() {
    if (main()) {
      std::string tmp = opt.run_dir + "/final.tmp";
      std::error_code ec;
      std::filesystem::remove_all(tmp, ec);
      try {
        stage.save_model(tmp);
        replace_dir_atomic(tmp, opt.run_dir + "/final");
        try {
          stage.after_final(opt.run_dir);
        } catch (const std::exception& e) {
          // final/ is complete: what goes beside it (final-merged/) must not fail the run.
          log::warn(std::string("after writing final/: ") + e.what());
        }
      } catch (...) {
        checkpoint::discard_partial_write(tmp, "final/");
        throw;
      }
      const std::string summary = write_report();
      std::fprintf(stderr, "%s\n", summary.c_str());
      std::fflush(stderr);
      write_finished_marker(opt.run_dir, step, total_steps);  // last: the run is complete
    }
    comm.barrier();
  }
};

// Sums per-step values over ranks in one collective: `keys` (the metric names, in order) must be
// the same on every rank.
void sum_over_ranks(parallel::Comm& comm, std::vector<double>* values, const std::string& keys) {
  if (comm.world_size() == 1) return;
  check_same_on_all_ranks(comm, hash_of(keys) ^ static_cast<int64_t>(values->size()), "the metric names of this step",
                          "every rank's stage must report the same metrics (" + keys + ")");
  at::Tensor t = at::tensor(*values, at::kDouble);
  comm.all_reduce(t, parallel::ReduceOp::kSum);
  std::memcpy(values->data(), t.data_ptr<double>(), values->size() * sizeof(double));
}

Trainer::Trainer(Stage& stage, TrainerOptions options) : impl_(std::make_unique<Impl>(stage, std::move(options))) {}
Trainer::~Trainer() = default;
int64_t Trainer::step() const { return impl_->step; }
int64_t Trainer::total_steps() const { return impl_->total_steps; }
const optim::AdamW& Trainer::optimizer() const {
  return impl_->zero1 ? impl_->zero1->local() : impl_->zero2 ? impl_->zero2->local() : *impl_->adamw;
}

int64_t Trainer::run() {
  Impl& s = *impl_;
  const TrainerOptions& o = s.opt;
  parallel::Comm& comm = s.comm;
  const bool main = s.main();
  if (main) {
    claim_run_folder(o.run_dir, log::info);  // trainer_options did it already for the commands
    clear_finished_marker(o.run_dir);        // until final/ is written again
    if (!o.resolved_recipe.empty()) write_file_atomic(o.run_dir + "/config.json", o.resolved_recipe);
  }
  const std::string resumed_from = s.resume();
  if (s.step >= s.total_steps) {
    // Nothing to train (a checkpoint of the run's last step, e.g. written just before a crash that
    // left final/ unwritten): no step loop, no throughput, only final/ from that checkpoint.
    if (main)
      log::info(o.label + ": " + (resumed_from.empty() ? std::string("the run") : resumed_from) + " is at step " +
                std::to_string(s.step) + " of " + std::to_string(s.total_steps) +
                ": nothing to train; writing final/ from it");
    s.write_final();
    if (main) log::info("wrote " + o.run_dir + "/final (step " + std::to_string(s.step) + ")");
    return 0;
  }
  if (main && (comm.world_size() > 1 || s.sharding != "none")) {
    std::string what = "data parallel: " + std::to_string(comm.world_size()) + " rank" +
                       (comm.world_size() == 1 ? "" : "s") + " over " + comm.backend() + ", train.sharding=" + s.sharding;
    if (s.zero2) what += " (" + std::to_string(s.zero2->num_buckets()) + " gradient buckets, reduce-scattered)";
    log::info(what);
  }
  s.run_start = Clock::now();
  s.run_start_step = s.step;
  std::unique_ptr<MetricsWriter> metrics;
  std::unique_ptr<tb::EventWriter> events;
  if (main) metrics = std::make_unique<MetricsWriter>(o.run_dir + "/metrics.jsonl", s.step);
  if (main && o.tensorboard) events = std::make_unique<tb::EventWriter>(o.run_dir + "/tb", s.step);
  const double flops_per_token = s.stage.flops_per_token();
  // MFU against a stable peak: the declared one, else the theoretical peak of this process's CPU
  // threads (never a timed matmul, which reads low on a loaded machine: peak_flops.h).
  // On a CUDA device: its dense peak from the table by name, else a synced GEMM (device_peak.h).
  double peak = o.peak_flops;
  if (peak <= 0 && flops_per_token > 0) {
    const bool bf16 = !s.params.empty() && s.params.front().second.scalar_type() == at::kBFloat16;
    if (s.device().is_cuda()) {
      const DevicePeak dp = cuda_peak_flops(s.device().index(), bf16);
      peak = dp.flops;
      if (main) {
        char tf[64];
        std::snprintf(tf, sizeof tf, "%.1f TFLOP/s", peak / 1e12);
        log::info("MFU against " + dp.source + (peak > 0 ? std::string(": ") + tf : std::string(" (no MFU)")));
      }
    } else {
      peak = this_cpu_peak_flops(at::get_num_threads(), bf16).flops;
    }
  }
  if (comm.world_size() > 1) {  // the ranks' cores together; none when any rank lacks a peak
    const double lacking = comm.all_reduce(peak > 0 ? 0.0 : 1.0, parallel::ReduceOp::kSum);
    peak = lacking > 0 ? 0 : comm.all_reduce(peak, parallel::ReduceOp::kSum);
  }
  const int64_t start_step = s.step;
  const int64_t mbpe = s.stage.micro_batches_per_epoch();
  std::unique_ptr<Progress> progress;
  if (main) {
    progress = std::make_unique<Progress>(o.label, s.total_steps, "steps", 10.0);
    progress->set_start(s.step);  // a resumed run's rate counts this process's steps only
    progress->update(s.step);
  }
  std::vector<at::Tensor> param_tensors = tensors_of(s.params);
  // Loading, resuming and the peak measurement are done: hand their freed temporaries back once, so
  // that the steps (which keep what they free, runtime::init) start from live data only.
  runtime::release_freed_memory();
  while (s.step < s.total_steps) {
    auto t0 = Clock::now();
    // Fetch the step's micro-batches first: the loss is normalized by their total target count
    // over all ranks (TRL's average_tokens_across_devices).
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
    if (comm.world_size() > 1) {
      auto t = at::tensor({n_targets, n_tokens}, at::kLong);
      comm.all_reduce(t, parallel::ReduceOp::kSum);
      n_targets = t[0].item<int64_t>();
      n_tokens = t[1].item<int64_t>();
    }
    // The loss, tensor metrics and tensor ratios stay on the device through the micro-batches and
    // are read once per optimizer step, together with the gradient norm (StepReads).
    StepReads reads;
    std::vector<std::pair<std::string, double>> sums;
    std::vector<int> counts;
    std::vector<std::string> ratio_keys;
    std::vector<std::vector<double>> ratio_nd;  // per key: num, den per micro-batch
    auto metric_index = [&](const std::string& key) {
      size_t i = 0;
      while (i < sums.size() && sums[i].first != key) ++i;
      if (i == sums.size()) {
        sums.emplace_back(key, 0.0);
        counts.push_back(0);
      }
      return i;
    };
    auto ratio_index = [&](const std::string& name) {
      size_t i = 0;
      while (i < ratio_keys.size() && ratio_keys[i] != name) ++i;
      if (i == ratio_keys.size()) {
        ratio_keys.push_back(name);
        ratio_nd.emplace_back(2 * mbs.size(), 0.0);
      }
      return i;
    };
    // A micro-batch's host-side metrics and ratios (LossOut::metrics, ::ratios).
    auto host_values = [&](const LossOut& lo, size_t mb) {
      for (auto& [key, v] : lo.metrics.values()) {
        size_t i = metric_index(key);
        if (std::isfinite(v)) {
          sums[i].second += v;
          ++counts[i];
        }
      }
      for (auto& r : lo.ratios) {
        size_t i = ratio_index(r.name);
        ratio_nd[i][2 * mb] = r.num;
        ratio_nd[i][2 * mb + 1] = r.den;
      }
    };
    std::vector<std::pair<size_t, std::function<void(LossOut&)>>> deferred;  // LossOut::read_back per micro-batch
    for (size_t k = 0; k < mbs.size(); ++k) {
      const bool last_mb = k + 1 == mbs.size();
      LossOut out = s.stage.loss(mbs[k], static_cast<double>(std::max<int64_t>(n_targets, 1)));
      if (s.zero2) s.zero2->begin_backward();  // ZeRO-2: every micro-batch reduce-scattered into the shard
      else if (last_mb && s.grad_sync) s.grad_sync->arm();  // earlier micro-batches accumulate locally
      out.loss.backward();
      if (s.zero2) s.zero2->end_backward();
      else if (last_mb && s.grad_sync) s.grad_sync->finish();
      reads.add_loss(out.loss);
      // Filled after the step's one read below (LossOut::read_back): no host read per micro-batch.
      if (out.read_back) deferred.emplace_back(k, std::move(out.read_back));
      host_values(out, k);
      for (auto& [key, t] : out.tensor_metrics) reads.add_metric(metric_index(key), key, t);
      for (auto& r : out.tensor_ratios) reads.add_ratio(ratio_index(r.name), k, r.name, r.num, r.den);
    }
    // Clipping before the read: the norm joins the one copy to the host of this step, and the NaN
    // guard decides on it (the same on every rank: the gradients are summed) before AdamW runs.
    // ZeRO-2: the norm of the whole gradient from the shards' squared norms summed over ranks.
    at::Tensor norm_t = s.zero2 ? s.zero2->clip_grad_norm(o.clip_grad_norm)
                                : optim::clip_grad_norm_tensor(param_tensors, o.clip_grad_norm);
    double loss_sum = 0, norm = 0;
    reads.read(norm_t, &loss_sum, &norm, &sums, &counts, &ratio_nd);
    // The stages' read_back closures, in micro-batch order on every rank (some all-reduce): the device
    // work is done by now, so their reads wait for nothing.
    for (auto& [mb, fill] : deferred) {
      LossOut later;
      fill(later);
      host_values(later, mb);
    }
    // Metrics over ranks (docs/FORMULAS.md section 0): the loss and counts summed, plain metrics averaged
    // over every (rank, micro-batch) value, ratios as sum(num) / sum(den) per micro-batch.
    if (comm.world_size() > 1) {
      std::vector<double> v{loss_sum};
      std::string keys;
      for (size_t i = 0; i < sums.size(); ++i) {
        v.push_back(sums[i].second);
        v.push_back(counts[i]);
        keys += sums[i].first + ";";
      }
      for (size_t i = 0; i < ratio_keys.size(); ++i) {
        v.insert(v.end(), ratio_nd[i].begin(), ratio_nd[i].end());
        keys += "ratio:" + ratio_keys[i] + ";";
      }
      sum_over_ranks(comm, &v, keys);
      size_t at = 0;
      loss_sum = v[at++];
      for (size_t i = 0; i < sums.size(); ++i) {
        sums[i].second = v[at++];
        counts[i] = static_cast<int>(v[at++]);
      }
      for (size_t i = 0; i < ratio_keys.size(); ++i)
        for (auto& x : ratio_nd[i]) x = v[at++];
    }
    double lr = s.schedule.lr_at(s.step);
    bool ok = s.guard.check(norm, s.step + 1);  // the same on every rank: the gradients are
    if (ok) s.optimizer_step(lr);
    s.zero_grad();
    ++s.step;
    s.tokens_seen += n_tokens;
    double dt = seconds_since(t0);
    Metrics m;
    m.add("loss", loss_sum).add("lr", lr).add("learning_rate", lr).add("grad_norm", norm);
    m.add("tokens_per_s", n_tokens / dt);
    if (flops_per_token > 0 && peak > 0) m.add("mfu", flops_per_token * n_tokens / dt / peak);
    m.add("step_time_s", dt).add("peak_rss_bytes", static_cast<double>(runtime::peak_rss_bytes()));
    runtime::CudaMemoryStats mem;
    if (s.device().is_cuda() && runtime::cuda_memory_stats(s.device().index(), &mem, /*reset_peak=*/true)) {
      // The caching allocator since the previous step's line (its peaks are reset after each read).
      constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
      m.add("memory/allocated_gib", mem.allocated / kGiB).add("memory/reserved_gib", mem.reserved / kGiB);
      m.add("memory/peak_allocated_gib", mem.peak_allocated / kGiB).add("memory/peak_reserved_gib", mem.peak_reserved / kGiB);
    }
    m.add("num_tokens", static_cast<double>(s.tokens_seen));
    m.add("epoch", static_cast<double>(s.micro_batches_done) / mbpe);
    if (!ok) m.add("skipped_step", 1);
    for (size_t i = 0; i < sums.size(); ++i)
      m.add(sums[i].first, counts[i] ? sums[i].second / counts[i] : std::nan(""));
    for (size_t i = 0; i < ratio_keys.size(); ++i) {
      double total = 0;
      int n = 0;
      for (size_t k = 0; k < mbs.size(); ++k) {
        if (ratio_nd[i][2 * k + 1] == 0) continue;
        total += ratio_nd[i][2 * k] / ratio_nd[i][2 * k + 1];
        ++n;
      }
      m.add(ratio_keys[i], n ? total / n : std::nan(""));
    }
    bool last = s.step == s.total_steps ||
                (s.total_micro_batches >= 0 && s.micro_batches_done >= s.total_micro_batches);
    std::string eval_text;
    if ((o.eval_every > 0 && s.step % o.eval_every == 0) || last) {
      Metrics e;
      const auto eval_t0 = Clock::now();
      s.stage.evaluate(&e);
      std::vector<double> v;
      std::string keys;
      for (auto& [k, x] : e.values()) {
        v.push_back(x);
        keys += k + ";";
      }
      sum_over_ranks(comm, &v, keys);  // eval metrics: the mean over ranks
      Metrics shown;
      for (size_t i = 0; i < v.size(); ++i) {
        m.add("eval/" + e.values()[i].first, v[i] / comm.world_size());
        shown.add(e.values()[i].first, v[i] / comm.world_size());
      }
      if (main && !shown.values().empty())
        eval_text = eval_line(o.label, s.step, s.total_steps, s.view, shown, seconds_since(eval_t0));
    }
    if (main) {
      metrics->write(s.step, m);
      if (events) events->write(s.step, m.values());
      if (s.step % o.log_every == 0 || last) progress->update(s.step, progress_metrics(s.view, m));
      if (!eval_text.empty()) progress->message(eval_text);  // below the step's progress line
    }
    if (o.checkpoint_every > 0 && s.step % o.checkpoint_every == 0) s.save_checkpoint();
    if (last) break;
  }
  if (main) progress->finish();
  s.write_final();
  if (main) log::info("wrote " + o.run_dir + "/final (step " + std::to_string(s.step) + ")");
  return s.step - start_step;
}

}  // namespace ptk::train
