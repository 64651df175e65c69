#include "core/train/from_recipe.h"

#include <limits>

#include "core/checkpoint/hf_config.h"
#include "core/checkpoint/model_folder.h"
#include "core/kernels/dispatch.h"
#include "core/parallel/comm.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/train/checkpoint_dir.h"
#include "core/train/rerun.h"
#include "core/train/run_folder.h"
#include "core/runtime/device.h"
#include "core/runtime/log.h"

namespace ptk::train {

std::string run_dir_of(const config::TrainingRecipe& r, const std::string& recipe_file) {
  return r.run.dir.empty() ? config::default_run_dir(recipe_file) : r.run.dir;
}

bool is_fresh_run(const config::TrainingRecipe& r, const std::string& run_dir) {
  if (r.root.resume == "never") return true;
  if (r.root.resume != "auto") return false;
  return CheckpointDir(run_dir + "/checkpoints", r.checkpoint.keep_last).latest().empty();
}

model::LoadOptions model_load_options(const config::ModelSection& m, const at::Device& device) {
  model::LoadOptions o;
  o.device = device;
  o.dtype = m.bf16_params(device.is_cuda()) ? at::kBFloat16 : at::kFloat;
  return o;
}

model::Qwen2Model load_model(const config::ModelSection& m, uint64_t seed, const std::string& path_hint,
                             const at::Device& device) {
  const model::LoadOptions o = model_load_options(m, device);
  if (!m.path.empty()) return model::Qwen2Model::from_pretrained(m.path, o);
  if (!m.config.empty()) return model::Qwen2Model::from_config(checkpoint::read_config(m.config), seed, o);
  throw Error("set model.path (" + path_hint + ") or model.config (a config.json for random init)");
}

void check_memory_estimate(const config::TrainingRecipe& r, const MemoryPlan& plan, parallel::Comm& comm) {
  if (!r.train.memory_check) return;
  const std::string why = memory_refusal(plan, available_memory(plan.cuda, plan.device));
  // Every rank decides for itself (memory differs between machines) and all stop together.
  double refused = why.empty() ? 0.0 : 1.0;
  if (comm.world_size() > 1) refused = comm.all_reduce(refused, parallel::ReduceOp::kSum);
  if (!why.empty()) throw Error(why);
  if (refused > 0)
    throw Error(std::to_string(static_cast<int>(refused)) + " other rank(s) refused this recipe: its memory estimate "
                "exceeds what they have (their message says which key to lower)");
}

TrainerOptions trainer_options(const config::TrainingRecipe& r, const std::string& run_dir,
                               const std::string& resolved_recipe, const std::string& label) {
  // First, before anything is prepared, loaded or written: a finished run of this recipe stops here
  // (exit 0), and checkpoints trained with another recipe are refused with the differences.
  check_rerun(run_dir, r.root.resume, resolved_recipe, label, log::info);
  // run.device next: a GPU asked for on a machine without one is refused before anything is made.
  const at::Device device = runtime::resolve_device(r.run.device, "run.device");
  // A model.path that is not a model folder is named as such here, not later as a tokenizer problem
  // (the stages read the tokenizer from model.path when tokenizer.path is empty).
  if (!r.model.path.empty()) checkpoint::require_model_folder(r.model.path, "model.path");
  make_dirs(run_dir);  // only now: a refused rerun or a wrong model.path leaves no new folder behind
  kernels::configure(kernels::options_from(r.kernels));  // once per process, before any forward
  TrainerOptions o;
  o.run_dir = run_dir;
  o.resolved_recipe = resolved_recipe;
  o.resume = r.root.resume;
  o.seed = r.run.seed;
  o.epochs = r.train.epochs;
  o.max_steps = r.train.max_steps;
  o.grad_accum = r.train.grad_accum;
  o.eval_every = r.train.eval_every;
  o.log_every = r.train.log_every;
  o.tensorboard = r.train.tensorboard;
  o.lr = r.optim.lr;
  o.min_lr = r.optim.min_lr;
  o.clip_grad_norm = r.optim.clip_grad_norm;
  o.schedule = r.optim.schedule;
  o.warmup_steps = r.optim.warmup_steps;
  o.adamw.beta1 = r.optim.betas.at(0);
  o.adamw.beta2 = r.optim.betas.at(1);
  o.adamw.eps = r.optim.eps;
  o.adamw.weight_decay = r.optim.weight_decay;
  o.checkpoint_every = r.checkpoint.every;
  o.keep_last = r.checkpoint.keep_last;
  o.label = label;
  o.zero1 = r.train.zero1;
  o.sharding = r.train.sharding;
  if (!r.train.memory_check) o.memory_budget_bytes = std::numeric_limits<double>::infinity();
  // World size 1 (no process group) unless torchrun's environment names more ranks.
  parallel::CommOptions co;
  co.timeout_s = r.dist.timeout_s;
  co.backend = r.dist.backend;
  co.cuda = device.is_cuda();  // backend auto: NCCL only for a model on a GPU
  o.comm = parallel::Comm::from_environment(co);
  if (o.comm.world_size() > 1) {
    // Each rank's model on the GPU its process group uses: cuda:N would put every rank on one GPU.
    if (device.is_cuda() && device.index() != o.comm.local_rank())
      throw Error("run.device = " + r.run.device + " puts rank " + std::to_string(o.comm.rank()) + "'s model on cuda:" +
                  std::to_string(device.index()) + " but its process group on cuda:" + std::to_string(o.comm.local_rank()) +
                  " (LOCAL_RANK)\n---> HINT: with several ranks use run.device=auto or cuda (each rank: cuda:LOCAL_RANK)");
  }
  // Before the stage prepares data or loads anything: this process owns the run folder, and what
  // crashed runs left there (a partial final/ or checkpoint, maybe hundreds of GB) is removed.
  if (o.comm.rank() == 0) claim_run_folder(run_dir, log::info);
  return o;
}

}  // namespace ptk::train
