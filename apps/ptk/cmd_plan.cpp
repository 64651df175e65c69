// `ptk plan --recipe FILE [--stage sft|dpo|rm|grpo] [--gpu-memory GiB] [key.path=value ...]`: the
// memory plan of a training recipe (core/train/memory_estimate.h) printed without training: what stays
// resident, the phase that peaks, the total, and whether it fits this machine or a GPU of the given
// size. Reads the model's config.json only (model.path or model.config): no weights, no data, no
// run folder. Not the stages' own check (they refuse a recipe that does not fit before loading).
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/train/memory_estimate.h"
#include "core/util/error.h"
#include "core/util/strings.h"
#include "datasets/prepare.h"
#include "reward/rm_stage.h"
#include "rl/dpo_stage.h"
#include "rl/grpo_stage.h"
#include "sft/sft_stage.h"

namespace ptk::app {
namespace {

// The stage's own terms, as its run_<stage> adds them before check_memory_estimate (sft_stage.cpp,
// dpo_stage.cpp, rm_stage.cpp, grpo_stage.cpp).
void add_sft(const sft::SftRecipe& r, train::MemoryPlan* p) {
  p->eval_micro_batch_size = !data::has_eval_data(r.data) ? 0 : r.sft.eval_micro_batch_size;
  p->heldout_new_tokens = r.sft.heldout.prompts.empty() ? 0 : r.sft.heldout.max_new_tokens;
}
void add_rm(const reward::RmRecipe& r, train::MemoryPlan* p) {
  p->eval_micro_batch_size = !data::has_eval_data(r.data) ? 0 : r.rm.eval_micro_batch_size;
}
void add_grpo(const rl::GrpoRecipe& r, train::MemoryPlan* p) { rl::add_memory_plan(r, p); }
// dpo.precompute_ref_log_probs=auto goes live where a second model fits beside the policy (run_dpo);
// `avail` is what the plan is compared with.
std::string add_dpo(const rl::DpoRecipe& r, train::MemoryPlan* p, const train::AvailableMemory& avail) {
  const bool reference = !r.dpo.is_cpo();
  // A second model only without LoRA or with dpo.ref_path (dpo_stage.cpp's reference_copy).
  const bool reference_copy = reference && !(r.lora.enabled && r.dpo.ref_path.empty());
  const std::string& mode = r.dpo.precompute_ref_log_probs;
  p->eval_micro_batch_size = !data::has_eval_data(r.data) ? 0 : r.dpo.eval_micro_batch_size;
  p->heldout_new_tokens = r.dpo.heldout.prompts.empty() ? 0 : r.dpo.heldout.max_new_tokens;
  bool live_fits = true;
  if (reference_copy && mode == "auto") {
    train::MemoryPlan live = *p;
    live.live_reference = true;
    live_fits = train::memory_refusal(live, avail).empty();
  }
  p->live_reference = reference_copy && (mode == "false" || (mode == "auto" && live_fits));
  p->reference_pass_pairs = reference && mode != "false" ? r.dpo.precompute_ref_batch_size : 0;
  if (!reference) return "no reference (dpo.algorithm=cpo)";
  if (!reference_copy) return "reference = the base with the adapters off (LoRA: no second copy)";
  if (mode == "auto")
    return std::string("dpo.precompute_ref_log_probs=auto: ") +
           (live_fits ? "a live reference fits (the stage may still precompute when the run covers the data)"
                      : "a live reference does not fit, so the stage precomputes");
  return "dpo.precompute_ref_log_probs=" + mode;
}

std::string stage_flag(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--stage") && i + 1 < argc) return argv[i + 1];
    if (!std::strncmp(argv[i], "--stage=", 8)) return argv[i] + 8;
  }
  return "sft";
}

std::string row(const std::string& what, double bytes, const train::MemoryTerm& t) {
  std::string in = t.keys;
  if (!t.note.empty()) in += (in.empty() ? "" : "; ") + t.note;
  char buf[64];
  std::snprintf(buf, sizeof buf, "  %-42s %11s", what.c_str(), format_bytes(bytes).c_str());
  return std::string(buf) + (in.empty() ? "" : "  (" + in + ")") + "\n";
}

}  // namespace

int cmd_plan(int argc, char** argv) {
  namespace po = boost::program_options;
  const std::string stage = stage_flag(argc, argv);
  sft::SftRecipe sft_r;
  rl::DpoRecipe dpo_r;
  reward::RmRecipe rm_r;
  rl::GrpoRecipe grpo_r;
  std::vector<config::Section*> sections;
  config::TrainingRecipe* base = nullptr;
  train::StageKind kind;
  if (stage == "sft") sections = sft_r.all_sections(), base = &sft_r, kind = train::StageKind::kSft;
  else if (stage == "dpo") sections = dpo_r.all_sections(), base = &dpo_r, kind = train::StageKind::kDpo;
  else if (stage == "rm") sections = rm_r.all_sections(), base = &rm_r, kind = train::StageKind::kRm;
  else if (stage == "grpo") sections = grpo_r.all_sections(), base = &grpo_r, kind = train::StageKind::kGrpo;
  else throw UsageError("ptk plan: --stage must be sft, dpo, rm or grpo, not " + stage);

  cli::CommandLine cl(
      "plan", "ptk plan --recipe FILE [--stage sft|dpo|rm|grpo] [--gpu-memory GiB] [key.path=value ...]",
      "Prints the memory plan of a training recipe without training: per rank, what stays resident\n"
      "(weights, gradients, AdamW moments and fp32 masters; with model.lora.enabled=true the frozen base\n"
      "and the adapters' state), the phase that peaks (training step, eval, reference pass, generation)\n"
      "with the recipe keys each term grows with, the total, and whether it fits. Reads only the model's\n"
      "config.json (model.path or model.config, e.g. bench/shapes/qwen2.5-7b.json): no weights, no data,\n"
      "no run folder. Compared with this machine (its available RAM, or run.device's free GPU memory), or\n"
      "with --gpu-memory GiB: a CUDA device of that size (model.dtype=auto then means bfloat16). The same\n"
      "estimate the stages check before loading (train.memory_check; README, \"Memory estimate\"). Exit\n"
      "status 0 when the plan fits, 1 when it does not (the refusal the stage would print follows).\n"
      "The recipe keys listed below are the --stage's (`ptk plan --stage dpo --help` lists dpo's).");
  cl.flags().add_options()("stage", po::value<std::string>()->default_value("sft"),
                           "the stage whose recipe this is: sft | dpo | rm | grpo")(
      "gpu-memory", po::value<double>(),
      "plan for one CUDA device with this many GiB (e.g. 80); without it, this machine's memory");
  cl.accept_recipe(sections);
  if (!cl.parse(argc, argv)) return 0;
  auto json = config::load_recipe(cl.recipe(), cl.overrides());
  if (kind == train::StageKind::kGrpo)
    config::bind_recipe(json, sections, [&](config::Errors& e) { grpo_r.cross_check(e); });
  else
    config::bind_recipe(json, sections);
  const config::TrainingRecipe& r = *base;

  auto plan = train::memory_plan_from_recipe(r, kind);
  if (!plan)
    throw Error("ptk plan: " + cl.recipe() + ": no config.json to plan from: set model.path to an HF folder (or a PEFT " +
                "adapter folder) or model.config to a config.json, e.g. model.config=bench/shapes/qwen2.5-7b.json");
  train::AvailableMemory avail;
  if (cl.has("gpu-memory")) {
    const double gib = cl.get<double>("gpu-memory");
    if (!(gib > 0)) throw UsageError("ptk plan: --gpu-memory must be > 0 (GiB)");
    plan->cuda = true;
    plan->bf16 = r.model.bf16_params(true);
    char buf[64];
    std::snprintf(buf, sizeof buf, "--gpu-memory %g", gib);
    avail = {gib * 1024.0 * 1024.0 * 1024.0, buf};
  } else {
    avail = train::available_memory(plan->cuda, plan->device);
  }
  std::string dpo_note;
  switch (kind) {
    case train::StageKind::kSft: add_sft(sft_r, &*plan); break;
    case train::StageKind::kDpo: dpo_note = add_dpo(dpo_r, &*plan, avail); break;
    case train::StageKind::kRm: add_rm(rm_r, &*plan); break;
    case train::StageKind::kGrpo: add_grpo(grpo_r, &*plan); break;
  }

  const train::MemoryEstimate e = train::estimate_memory(*plan);
  const auto& c = plan->model;
  char head[512];
  std::snprintf(head, sizeof head,
                "ptk plan: %s, %s (hidden %lld, %lld layers, %lld heads / %lld kv heads, intermediate %lld, vocab %lld)\n"
                "  %.2fB parameters, %s on %s; trained: %s\n",
                stage.c_str(), plan->model_key.c_str(), static_cast<long long>(c.hidden_size),
                static_cast<long long>(c.num_hidden_layers), static_cast<long long>(c.num_attention_heads),
                static_cast<long long>(c.num_key_value_heads), static_cast<long long>(c.intermediate_size),
                static_cast<long long>(c.vocab_size), e.parameters / 1e9, plan->bf16 ? "bfloat16" : "float32",
                plan->cuda ? "a CUDA device" : "the CPU",
                plan->lora ? ("LoRA adapters, " + std::to_string(static_cast<long long>(e.trainable_parameters)) +
                              " parameters (model.lora.rank=" + std::to_string(plan->lora_rank) + ")")
                                 .c_str()
                           : "every parameter (full fine-tuning)");
  std::cout << head;
  std::cout << "  train.micro_batch_size=" << plan->micro_batch_size << ", data.max_seq_len=" << plan->max_seq_len
            << ", model.activation_checkpointing=" << (plan->activation_checkpointing ? "true" : "false") << "\n";
  if (!dpo_note.empty()) std::cout << "  " << dpo_note << "\n";
  double resident = 0;
  std::cout << "resident through the run:\n";
  for (const auto& t : e.resident) {
    std::cout << row(t.what, t.bytes, t);
    resident += t.bytes;
  }
  std::cout << "peak phase: " << e.phase << "\n";
  for (const auto& t : e.peak) std::cout << row(t.what, t.bytes, t);
  const bool fits = avail.bytes < 0 || e.total_bytes <= avail.bytes;
  std::cout << "total at the peak: " << format_bytes(e.total_bytes) << " (resident " << format_bytes(resident)
            << " + " << e.phase << " " << format_bytes(e.total_bytes - resident) << ")\n";
  if (avail.bytes < 0) {
    std::cout << "available: unknown here (" << (plan->cuda ? "no CUDA device" : "no /proc/meminfo")
              << "); --gpu-memory GiB plans for a GPU of that size\n";
    return 0;
  }
  std::cout << (fits ? "fits: " : "does not fit: ") << format_bytes(avail.bytes) << " available (" << avail.source
            << ")";
  if (fits) std::cout << ", " << format_bytes(avail.bytes - e.total_bytes) << " to spare\n";
  else std::cout << "\n" << train::memory_refusal(*plan, avail) << "\n";
  return fits ? 0 : 1;
}

}  // namespace ptk::app
