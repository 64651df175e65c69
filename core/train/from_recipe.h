// The shared recipe sections (docs/DESIGN.md's keys) turned into the loop's options, so every stage
// maps them the same way. Not the stage-specific sections.
#pragma once
#include <string>

#include "core/config/sections.h"  // TrainingRecipe
#include "core/model/qwen2.h"      // LoadOptions
#include "core/train/memory_estimate.h"  // MemoryPlan
#include "core/train/trainer.h"    // TrainerOptions

namespace ptk::train {

// run.dir, or runs/<recipe file name> when empty.
std::string run_dir_of(const config::TrainingRecipe& r, const std::string& recipe_file);

// True when this run starts from step 0: resume=never, or resume=auto with no complete
// checkpoint in run_dir/checkpoints yet (for "before training" evals).
bool is_fresh_run(const config::TrainingRecipe& r, const std::string& run_dir);

// model.dtype on `device` (run.device, resolved: stage_setup.h's run_device): float32 / bfloat16 as set;
// auto = bfloat16 on CUDA (AdamW keeps fp32 master weights and moments), float32 elsewhere (on the
// CPU bf16 is emulated and ~3x slower).
model::LoadOptions model_load_options(const config::ModelSection& m, const at::Device& device = at::kCPU);

// The model a stage trains: model.path (an HF folder) or model.config (random init from `seed`), in
// model.dtype, on `device`. Neither set: an Error "set model.path (<path_hint>) or model.config (a
// config.json for random init)".
model::Qwen2Model load_model(const config::ModelSection& m, uint64_t seed, const std::string& path_hint,
                             const at::Device& device = at::kCPU);

// Refuses the run (a ptk::Error on every rank of `comm`) when `plan`'s memory estimate exceeds what
// this rank has (memory_refusal). Stages call it after trainer_options() and before they load or
// allocate anything. Does nothing with train.memory_check=false.
void check_memory_estimate(const config::TrainingRecipe& r, const MemoryPlan& plan, parallel::Comm& comm);

// Also connects to the other ranks (parallel::Comm::from_environment) when WORLD_SIZE > 1.
// train.memory_check=false also lifts the trainer's own check of the loaded weights.
TrainerOptions trainer_options(const config::TrainingRecipe& r, const std::string& run_dir,
                               const std::string& resolved_recipe, const std::string& label);

}  // namespace ptk::train
