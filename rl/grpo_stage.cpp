// The GRPO stage: generation batches from the rollout engine, verifier rewards, advantages and the
// clipped objective through rl/grpo_loss.h, on core/train's loop. Not the loss math itself.
#include "rl/grpo_stage.h"

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <numeric>
#include <random>

#include "core/model/lm_head_logprobs.h"
#include "core/model/qwen2.h"
#include "core/runtime/device.h"
#include "core/runtime/device_memory.h"
#include "core/runtime/log.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/from_recipe.h"
#include "core/train/memory_estimate.h"
#include "core/train/stage_setup.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/strings.h"
#include "core/util/json.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "reward/reward_client.h"
#include "reward/verifiers.h"
#include "rollout/engine.h"
#include "eval/eval.h"

namespace ptk::rl {

void GrpoSection::visit(config::Visitor& v) {
  v.opt(num_generations, "num_generations", 8, "G: completions sampled per prompt (the group advantages compare)");
  v.opt(max_completion_length, "max_completion_length", 512,
        "most tokens generated per completion; also dr_grpo's normalizer. Longer = slower steps");
  v.opt(temperature, "temperature", 1.0, "sampling temperature; log-probs use logits / temperature (> 0)");
  v.opt(top_p, "top_p", 1.0, "nucleus sampling mass; 1 = off");
  v.opt(top_k, "top_k", 0, "keep the k most likely tokens; 0 = off");
  v.opt(reward_funcs, "reward_funcs", {"math"},
        "rule verifiers scoring each completion against the prompt's `answer` (math, exact, format_think, "
        "format_answer); each is one reward source rewards/<name>/*");
  v.opt(reward_weights, "reward_weights", {}, "one weight per reward_funcs entry, in order; empty = all 1");
  v.opt(reward_urls, "reward_urls", {},
        "reward servers (OpenRLHF /get_reward: `ptk reward-server`, or OpenRLHF's), one more source `remote`; "
        "requests spread over the URLs, retried, and a server that stays away fails the step (never a zero reward)");
  v.opt(remote_reward_weight, "remote_reward_weight", 1.0, "weight of the `remote` source (the servers' reward)");
  v.opt(reward_timeout_s, "reward_timeout_s", 120.0, "seconds one reward request may take before it is retried");
  v.opt(reward_max_attempts, "reward_max_attempts", 5, "attempts per request over all URLs (backoff between)");
  v.opt(reward_api_key, "reward_api_key", "", "sent as `Authorization: Bearer` when set");
  v.choice(scale_rewards, "scale_rewards", "group", {"group", "batch", "none"},
           "advantage = (R - group mean) / (std + 1e-4) with the group's std, the batch's, or no division");
  v.choice(multi_objective_aggregation, "multi_objective_aggregation", "sum_then_normalize",
           {"sum_then_normalize", "normalize_then_sum"}, "how several reward sources combine (FORMULAS 4.2)");
  v.choice(loss_type, "loss_type", "dapo", {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"},
           "aggregation over tokens (FORMULAS 4.4); dapo = token mean over the optimizer step");
  v.choice(importance_sampling_level, "importance_sampling_level", "token", {"token", "sequence"},
           "ratio per token, or one per completion (GSPO)");
  v.opt(beta, "beta", 0.0,
        "k3 KL weight to a frozen copy of the start model (with model.lora.enabled: the policy with its adapters "
        "off, no copy); 0 loads no reference (less memory)");
  v.opt(epsilon, "epsilon", 0.2, "lower clip: ratio >= 1 - epsilon");
  v.opt(epsilon_high, "epsilon_high", 0.0, "upper clip 1 + epsilon_high (DAPO 0.28; cispo: absolute cap); 0 = epsilon");
  v.opt(delta, "delta", 0.0, "two-sided clip: ratio capped at delta (INTELLECT-2, > 1 + epsilon_high); 0 = off");
  v.opt(top_entropy_quantile, "top_entropy_quantile", 1.0,
        "train the policy term only on the top-rho entropy tokens (paper 0.2); 1 = all");
  v.opt(num_iterations, "num_iterations", 1,
        "mu: optimizer-step passes over each generation batch; 1 = ratio exactly 1 (on-policy)");
  v.opt(mask_truncated_completions, "mask_truncated_completions", false,
        "no loss on completions cut at max_completion_length (they keep their rewards)");
  v.opt(use_bias_correction_kl, "use_bias_correction_kl", false, "multiply the KL term by the ratio");
  v.opt(vllm_importance_sampling_correction, "vllm_importance_sampling_correction", true,
        "weight the policy term by exp(trainer - sampler log-probs), for when generation kernels (bf16, GPU) "
        "differ from training's");
  v.choice(vllm_importance_sampling_mode, "vllm_importance_sampling_mode", "sequence_mask",
           {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask"},
           "per token or per completion (sum of differences); truncate clamps, mask zeroes outside [min, max]");
  v.opt(vllm_importance_sampling_clip_min, "vllm_importance_sampling_clip_min", 0.0, "C_min; 0 = no lower bound");
  v.opt(vllm_importance_sampling_clip_max, "vllm_importance_sampling_clip_max", 3.0, "C_max");
  v.opt(dynamic_sampling, "dynamic_sampling", false,
        "DAPO: drop groups whose rewards are all equal (zero advantage) and sample more prompts to refill");
  v.opt(dynamic_sampling_max_rounds, "dynamic_sampling_max_rounds", 4,
        "most generation rounds per batch with dynamic_sampling; still short after them, the batch is "
        "topped up with dropped groups (zero advantage) and dynamic_sampling/short_groups says how many");
  v.choice(prompt_order, "prompt_order", "shuffle", {"shuffle", "variance_first"},
           "prompt order per epoch: a seeded shuffle, or (from the 2nd epoch, Qwen2.5 report) highest "
           "reward variance of the previous visit first");
  v.opt(log_rollouts_every, "log_rollouts_every", 1,
        "write rollouts/step-N.jsonl every this many generation batches; 0 = never");
  v.opt(eval_max_prompts, "eval_max_prompts", 0, "held-out prompts scored per eval; 0 = all of data.eval");
  v.opt(eval_max_new_tokens, "eval_max_new_tokens", 0, "eval generation length; 0 = max_completion_length");
  v.opt(eval_verifier, "eval_verifier", "math", "verifier whose mean on data.eval is eval/accuracy");
  v.opt(eval_num_samples, "eval_num_samples", 0,
        "also sample this many completions of every held-out prompt as training samples them (temperature, "
        "top_p, top_k) and log their mean verifier reward as eval/sampled_accuracy (TRL evaluates with "
        "sampling); each prompt's seed is fixed, so every eval scores the same draws; 0 = greedy only");
  v.opt(eval_at_start, "eval_at_start", true, "log the held-out accuracy before the first step (fresh runs)");
  v.choice(reference_device, "reference_device", "same", {"same", "host"},
           "where the frozen reference copy of full fine-tuning (beta != 0) lives: same = on the policy's device "
           "for the whole run (one more model's memory there); host = in (pinned) host memory, copied to the device "
           "once per generation batch for its reference pass and freed after, so the update and the KV cache never "
           "share the device with it (OpenRLHF's --ref_reward_offload, verl's ref param_offload); costs one "
           "host-to-device copy of the weights per generation batch. No effect under model.lora (the reference is "
           "the policy with its adapters off) or on the CPU (host memory is the device's)");
}

void GrpoSection::validate(config::Errors& e) const {
  auto q = [](double x) { return std::to_string(x); };
  if (num_generations < 2)
    e.add("grpo.num_generations = " + std::to_string(num_generations) +
          ": needs >= 2 (a group of one has no relative advantage)");
  if (max_completion_length < 1) e.add("grpo.max_completion_length must be >= 1");
  if (!(temperature > 0))
    e.add("grpo.temperature = " + q(temperature) + ": must be > 0 (GRPO samples; log-probs divide by it)");
  if (!(top_p > 0 && top_p <= 1)) e.add("grpo.top_p = " + q(top_p) + ": must be in (0, 1]");
  if (top_k < 0) e.add("grpo.top_k must be >= 0");
  if (reward_funcs.empty() && reward_urls.empty())
    e.add("no reward source: name verifiers in grpo.reward_funcs (" + reward::verifier_names() +
          ") and/or reward servers in grpo.reward_urls");
  if (reward_timeout_s <= 0 || reward_max_attempts < 1)
    e.add("grpo.reward_timeout_s must be > 0 and grpo.reward_max_attempts >= 1");
  if (!reward_weights.empty() && reward_weights.size() != reward_funcs.size())
    e.add("grpo.reward_weights has " + std::to_string(reward_weights.size()) + " weights for " +
          std::to_string(reward_funcs.size()) + " reward_funcs: give one per source, or none (all 1)");
  if (beta < 0) e.add("grpo.beta = " + q(beta) + ": must be >= 0");
  if (!(epsilon > 0)) e.add("grpo.epsilon = " + q(epsilon) + ": must be > 0");
  if (epsilon_high < 0) e.add("grpo.epsilon_high must be >= 0 (0 = epsilon)");
  double eh = epsilon_high > 0 ? epsilon_high : epsilon;
  if (delta != 0 && !(delta > 1 + eh))
    e.add("grpo.delta = " + q(delta) + ": must exceed 1 + epsilon_high = " + q(1 + eh) + " (or 0 = off)");
  if (!(top_entropy_quantile > 0 && top_entropy_quantile <= 1))
    e.add("grpo.top_entropy_quantile = " + q(top_entropy_quantile) + ": must be in (0, 1]");
  if (num_iterations < 1) e.add("grpo.num_iterations must be >= 1");
  if (vllm_importance_sampling_clip_max <= 0) e.add("grpo.vllm_importance_sampling_clip_max must be > 0");
  if (vllm_importance_sampling_clip_min < 0 || vllm_importance_sampling_clip_min >= vllm_importance_sampling_clip_max)
    e.add("grpo.vllm_importance_sampling_clip_min = " + q(vllm_importance_sampling_clip_min) +
          ": must be in [0, clip_max = " + q(vllm_importance_sampling_clip_max) + ")");
  if (dynamic_sampling_max_rounds < 1) e.add("grpo.dynamic_sampling_max_rounds must be >= 1");
  if (log_rollouts_every < 0) e.add("grpo.log_rollouts_every must be >= 0");
  if (eval_max_prompts < 0 || eval_max_new_tokens < 0 || eval_num_samples < 0)
    e.add("grpo.eval_max_prompts / eval_max_new_tokens / eval_num_samples must be >= 0");
  try {
    reward::find_verifier(eval_verifier);
  } catch (const std::exception& ex) {
    e.add(std::string("grpo.eval_verifier: ") + ex.what());
  }
}

void RolloutSection::visit(config::Visitor& v) {
  v.opt(slots, "slots", 64,
        "sequences the engine decodes together; more = faster generation until compute-bound, more KV-cache memory");
  v.opt(gpu_memory_fraction, "gpu_memory_fraction", 0.9,
        "CUDA: the KV cache fits in this fraction of the GPU's memory minus what is in use when it is allocated "
        "(as vLLM's gpu_memory_utilization); fewer than rollout.slots slots run when they do not fit (logged), an "
        "error when not one does. 0 = rollout.slots whatever the memory. Ignored on the CPU");
  v.choice(device_loop, "device_loop", "auto", {"auto", "on", "off"},
           "where the decode loop runs: auto = on the device for CUDA (state and sampling there, one copy each way "
           "a step, CUDA graphs), the host loop on the CPU (its AVX-512 packed weights are faster there); off = the "
           "host loop everywhere (each step's ids, positions and sampling built on the host)");
  v.opt(cuda_graphs, "cuda_graphs", true,
        "CUDA: capture each (slot-count, key-length) bucket's decode step as a CUDA graph once per generation batch and replay "
        "it (fewer kernel launches); false = eager decode steps (profiling, debugging). Ignored on the CPU");
}

void RolloutSection::validate(config::Errors& e) const {
  if (slots < 1) e.add("rollout.slots must be >= 1");
  if (!(gpu_memory_fraction >= 0.0 && gpu_memory_fraction <= 1.0))
    e.add("rollout.gpu_memory_fraction must be in [0, 1] (0 = off; got " + std::to_string(gpu_memory_fraction) + ")");
}

void GrpoRecipe::check() const {
  config::Errors e;
  cross_check(e);
  if (!e.items.empty()) {
    std::string msg = "grpo recipe:";
    for (auto& s : e.items) msg += "\n  " + s;
    throw Error(msg);
  }
}

void GrpoRecipe::cross_check(config::Errors& e) const {
  std::vector<std::string>& errs = e.items;
  // Runs beside the sections' own range checks (config::bind_recipe), so values they refuse
  // (num_generations < 2, ...) can reach here: skip what they make meaningless.
  const int64_t per_step = train.micro_batch_size * train.grad_accum;
  if (grpo.num_generations >= 2 && per_step % grpo.num_generations != 0)
    errs.push_back("train.micro_batch_size * train.grad_accum = " + std::to_string(train.micro_batch_size) + " * " +
                   std::to_string(train.grad_accum) + " = " + std::to_string(per_step) +
                   " completions per rank and step is not a multiple of grpo.num_generations = " +
                   std::to_string(grpo.num_generations) +
                   "\n---> HINT: each rank generates whole groups; e.g. train.micro_batch_size = " +
                   std::to_string(grpo.num_generations));
  if (grpo.num_iterations > 1 && checkpoint.every > 0 && checkpoint.every % grpo.num_iterations != 0)
    errs.push_back("checkpoint.every = " + std::to_string(checkpoint.every) +
                   " is not a multiple of grpo.num_iterations = " + std::to_string(grpo.num_iterations) +
                   ": checkpoints must fall between generation batches (a batch's passes are not saved)");
  if (data.train.empty()) errs.push_back("data.train is empty: name the RL prompt files ({\"prompt\": ..., \"answer\": ...})");
}

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The engine's options a recipe's rollout section sets (slots, device loop, graphs, memory share).
rollout::EngineOptions engine_options(const RolloutSection& s) {
  rollout::EngineOptions eo;
  eo.slots = s.slots;
  eo.gpu_memory_fraction = s.gpu_memory_fraction;
  eo.cuda_graphs = s.cuda_graphs;
  using Mode = rollout::EngineOptions::DeviceLoopMode;
  eo.device_loop = s.device_loop == "on" ? Mode::kOn : s.device_loop == "off" ? Mode::kOff : Mode::kAuto;
  return eo;
}

double weight_bytes(const model::Qwen2Model& m) {
  double b = 0;
  for (const auto& [name, t] : m.named_parameters()) b += static_cast<double>(t.numel()) * static_cast<double>(t.element_size());
  return b;
}

// Waits for the device's queued work where it runs asynchronously (CUDA), so a phase's wall time is
// its own; nothing on the CPU or meta.
void sync_for_timing(const at::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.has_index() ? d.index() : -1);
}

}  // namespace

// The generation batch's pieces (outside the anonymous namespace: GrpoSlice, named in the header, holds them).
struct Prompt {
  int64_t row = 0;  // row of the prepared set
  std::vector<int64_t> ids;
  std::string answer;
};

struct Completion {
  int64_t prompt = 0;  // index into GenBatch::prompts
  std::vector<int64_t> ids;
  std::vector<float> sampler_logps;
  bool truncated = false;
  std::vector<double> rewards;  // per source, NaN = none
  double reward = 0, advantage = 0;
  std::string text;
};

// One rank's generation batch: whole groups, completion-major order shuffled (as TRL does).
struct GenBatch {
  std::vector<Prompt> prompts;
  std::vector<Completion> completions;
  std::vector<int64_t> order;  // the shuffled order micro-batches are cut from
  Metrics metrics;             // generation metrics (global), attached to its first micro-batch
};

// One micro-batch's rows of a GenBatch, with what pass 0 computes for later passes.
struct GrpoSlice {
  std::shared_ptr<GenBatch> gen;
  std::vector<int64_t> rows;  // indices into gen->completions
  at::Tensor input_ids, attention_mask;       // (B, L)
  at::Tensor completion_ids, mask;            // (B, Tc)
  at::Tensor gather_src, gather_dst;          // flat (B*L) hidden rows -> flat (B*Tc) slots
  at::Tensor advantages;                      // (B)
  at::Tensor sampler_logps;                   // (B, Tc)
  std::vector<int64_t> prompt_lengths;
  std::vector<std::pair<int64_t, int64_t>> row_spans;  // (B) {0, prompt + completion}, host-side
  at::Tensor old_logps, ref_logps, is_weights;  // filled by pass 0
  std::function<NamedValues()> is_metrics;      // pass 0's importance-sampling metrics, read back after its step
  int64_t active_tokens = 0, tokens = 0;
};

namespace {

using Slice = GrpoSlice;
using MbData = GrpoMicroBatchData;

double nan_mean(const std::vector<double>& v) {
  double s = 0;
  int64_t n = 0;
  for (double x : v)
    if (!std::isnan(x)) s += x, ++n;
  return n ? s / n : std::nan("");
}

// Unbiased NaN-ignoring variance (NaN when fewer than 2 values).
double nan_var(const std::vector<double>& v) {
  double m = nan_mean(v), s = 0;
  int64_t n = 0;
  for (double x : v)
    if (!std::isnan(x)) s += (x - m) * (x - m), ++n;
  return n > 1 ? s / (n - 1) : std::nan("");
}

}  // namespace

struct GrpoStage::Impl {
  GrpoRecipe& r;
  std::string run_dir;
  parallel::Comm comm;
  int rank = 0, world = 1;
  train::Policy p;  // the policy (p.model) on run.device, its tokenizer and pad id
  std::shared_ptr<const tokenizer::Tokenizer> tok;
  int64_t pad_id = 0;
  std::vector<int64_t> stop_ids;
  model::Qwen2Model& policy = p.model;
  model::Qwen2Model reference;  // on the policy's device, or (ref_on_host) a copy in host memory
  bool has_ref = false;
  bool ref_on_host = false;       // grpo.reference_device=host with a full-fine-tuning copy
  int64_t reference_uploads = 0;  // host -> device copies of the reference (tests)
  // time/update_s: from the end of the step's generation and reference phases (or, on a step
  // without them, its first micro-batch) to the step's one read (its last micro-batch's read_back).
  Clock::time_point update_t0 = Clock::now();
  std::unique_ptr<rollout::Engine> engine;
  std::unique_ptr<data::PreparedSet> train_set, eval_set;
  GrpoLossOptions loss_opt;
  GrpoAdvantageOptions adv_opt;
  GrpoImportanceOptions is_opt;
  std::vector<std::string> source_names;
  std::vector<std::function<double(const std::string&, const std::string&)>> reward_fns;  // per in-process source
  std::unique_ptr<reward::RewardClient> client;  // the `remote` source (last), when grpo.reward_urls is set
  std::vector<double> weights;
  int64_t G = 8, K = 1, mu = 1;
  int64_t prompts_per_gen = 1;  // per rank
  // Prompt order: epoch e, global position in the epoch (positions of all ranks), generations made.
  int64_t epoch = 0, pos = 0, generations = 0;
  std::vector<int64_t> order;        // this epoch's global row order
  std::vector<double> variance;      // per row: reward variance at its last visit (NaN = unseen)
  std::vector<MbData> buffer;  // remaining micro-batches of the current generation batch
  size_t buffer_next = 0;
  GrpoLossInputs last;
  std::map<std::string, std::pair<double, double>> remote_logs;  // server extra_logs: sum, count this batch

  // Whether the optimizer updates a weight that the rollout engine packs for decode (a layer's
  // linear or the LM head).
  bool packed_weights_trained() const {
    if (policy.lm_head_weight().requires_grad()) return true;
    for (const auto& [name, t] : policy.named_parameters())
      if (t.requires_grad() && name.find("_proj.weight") != std::string::npos) return true;
    return false;
  }

  Impl(GrpoRecipe& rec, const std::string& dir, parallel::Comm c, std::vector<RewardFunction> extra)
      : r(rec), run_dir(dir), comm(std::move(c)) {
    r.check();
    const auto& g = r.grpo;
    // Reward sources: rule verifiers by name, else the caller's C++ functions.
    for (auto& name : g.reward_funcs) {
      bool is_verifier = false;
      for (auto& v : reward::verifiers())
        if (name == v.name) {
          auto fn = v.fn;
          reward_fns.push_back([fn](const std::string& c, const std::string& a) { return fn(c, a); });
          is_verifier = true;
        }
      if (is_verifier) continue;
      auto it = std::find_if(extra.begin(), extra.end(), [&](const RewardFunction& f) { return f.name == name; });
      if (it == extra.end()) {
        try {
          reward::find_verifier(name);
        } catch (const std::exception& ex) {
          throw Error(std::string("grpo.reward_funcs: ") + ex.what());
        }
      }
      reward_fns.push_back(it->fn);
    }
    // Tokenizer and policy (and the frozen reference: a copy of the start weights), on run.device
    p = train::load_policy(r, train::run_device(r), "an HF folder, e.g. the SFT or DPO run's final/");
    tok = p.tokenizer;
    const std::string& tok_path = p.tok_path;
    pad_id = p.pad_id;
    for (int64_t id : {static_cast<int64_t>(tok->eos_id()), static_cast<int64_t>(tok->im_end_id())})
      if (id >= 0 && std::find(stop_ids.begin(), stop_ids.end(), id) == stop_ids.end()) stop_ids.push_back(id);
    if (stop_ids.empty())
      throw Error(tok_path + ": the tokenizer names no eos token (tokenizer_config.json eos_token) nor <|im_end|>; "
                  "GRPO needs one to end completions");
    // Every parameter, or with model.lora the adapters on a frozen base.
    train::make_trainable(p, r, run_dir, comm, "CAUSAL_LM");
    if (g.beta != 0) {
      if (auto off = train::adapters_off(p)) {
        if (comm.rank() == 0)
          log::info("grpo: the KL reference is the policy with its LoRA adapters off (no second copy)" +
                    std::string(r.model.adapter.empty() ? ""
                                                        : ": model.path without model.adapter, not the adapter's model"));
        reference = *off;  // LoRA: the policy with its adapters off, sharing the frozen base (no copy)
      } else if (g.reference_device == "host") {
        // A copy straight from the policy's weights into host memory (never a second device copy);
        // pinned when the policy is on a GPU, so each reference pass uploads it asynchronously.
        // On a GPU the copies are views into one page-locked buffer per dtype, allocated at its exact
        // size (runtime::pinned_host_bytes): LibTorch's pinned allocator would round each weight up
        // to a power of two, ~1.8x the weights at 7B.
        bool pin = false;
        if (p.device.is_cuda()) {
          std::map<at::ScalarType, int64_t> bytes;  // per dtype, each weight 64-byte aligned
          auto aligned = [](int64_t b) { return (b + 63) / 64 * 64; };
          for (const auto& [name, t] : policy.named_parameters()) bytes[t.scalar_type()] += aligned(t.nbytes());
          std::map<at::ScalarType, std::pair<at::Tensor, int64_t>> buffers;  // buffer, next free byte
          pin = true;
          for (const auto& [dtype, b] : bytes) {
            bool pinned = false;
            buffers[dtype] = {runtime::pinned_host_bytes(b, &pinned), 0};
            pin = pin && pinned;
          }
          reference = policy.map_weights([&](const at::Tensor& t) {  // the weights named_parameters() lists
            auto& [buf, at_byte] = buffers.at(t.scalar_type());
            auto h = buf.narrow(0, at_byte, t.nbytes()).view(t.scalar_type()).view(t.sizes());
            at_byte += aligned(t.nbytes());
            h.copy_(t.detach());
            return h;
          });
          if (!pin && comm.rank() == 0)
            log::warn("grpo: the reference's host copy could not be page-locked (cudaHostRegister failed; "
                      "`ulimit -l`?): its uploads are synchronous copies from pageable memory");
        } else {
          reference = policy.map_weights([&](const at::Tensor& t) {
            auto h = at::empty(t.sizes(), t.options().device(at::kCPU).requires_grad(false));
            if (!t.is_meta()) h.copy_(t.detach());  // meta (tests) holds shapes, no numbers to copy
            return h;
          });
        }
        ref_on_host = true;
        if (comm.rank() == 0)
          log::info("grpo: the KL reference is a frozen copy in " + std::string(pin ? "pinned " : "") +
                    "host memory (grpo.reference_device=host, " + format_bytes(weight_bytes(policy)) + ")" +
                    (p.device.is_cpu() ? std::string(", where the CPU policy reads it in place")
                                       : ", copied to " + runtime::device_name(p.device) +
                                             " for each generation batch's reference pass and freed after it"));
      } else {
        reference = policy.clone();
        reference.set_requires_grad(false);
        if (comm.rank() == 0)
          log::info("grpo: the KL reference is a frozen copy on " + runtime::device_name(p.device) +
                    " beside the policy (" + format_bytes(weight_bytes(policy)) +
                    "; grpo.reference_device=host keeps it in host memory between steps)");
      }
      has_ref = true;
    }
    rollout::EngineOptions eo = engine_options(r.rollout);
    eo.vocab_limit = static_cast<int64_t>(tok->vocab_size());
    // LoRA on a frozen base: the decode copies of the base weights (the packed linears and LM head
    // on AVX-512 CPUs) stay valid for the whole run, since the adapters apply after the packed
    // product and are read live; pack them once, not per generation batch. Not when a weight the
    // engine packs is trained (model.lora.modules_to_save with lm_head, or embed_tokens tied to it).
    eo.keep_packed = p.lora && !packed_weights_trained();
    engine = std::make_unique<rollout::Engine>(policy, eo);
    // Data
    auto popt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, data::Format::kRl);
    popt.tokenizer_path = tok_path;
    train_set = std::make_unique<data::PreparedSet>(
        data::PreparedSet::open(data::ensure_prepared(popt, data::prepared_dir(run_dir, "train"))));
    if (train_set->num_rows() == 0) throw Error("data.train has no prompts after preparation");
    if (data::has_eval_data(r.data)) {
      auto eopt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, data::Format::kRl, true);
      eopt.tokenizer_path = tok_path;
      eval_set = std::make_unique<data::PreparedSet>(
          data::PreparedSet::open(data::ensure_prepared(eopt, data::prepared_dir(run_dir, "eval"))));
    }
    variance.assign(train_set->num_rows(), std::nan(""));
    // Options of the loss functions
    G = g.num_generations;
    K = r.train.grad_accum;
    mu = g.num_iterations;
    prompts_per_gen = r.train.micro_batch_size * r.train.grad_accum / G;
    loss_opt.loss_type = g.loss_type;
    loss_opt.importance_sampling_level = g.importance_sampling_level;
    loss_opt.beta = g.beta;
    loss_opt.epsilon = g.epsilon;
    if (g.epsilon_high > 0) loss_opt.epsilon_high = g.epsilon_high;
    if (g.delta > 0) loss_opt.delta = g.delta;
    loss_opt.use_bias_correction_kl = g.use_bias_correction_kl;
    loss_opt.top_entropy_quantile = g.top_entropy_quantile;
    loss_opt.max_completion_length = g.max_completion_length;
    source_names = g.reward_funcs;
    weights = g.reward_weights.empty() ? std::vector<double>(source_names.size(), 1.0) : g.reward_weights;
    if (!g.reward_urls.empty()) {
      reward::RewardClientOptions co;
      co.urls = g.reward_urls;
      co.api_key = g.reward_api_key;
      co.timeout_s = g.reward_timeout_s;
      co.max_attempts = static_cast<int>(g.reward_max_attempts);
      client = std::make_unique<reward::RewardClient>(co);
      source_names.push_back("remote");
      weights.push_back(g.remote_reward_weight);
    }
    adv_opt.num_generations = G;
    adv_opt.reward_weights = weights;
    adv_opt.scale_rewards = g.scale_rewards;
    adv_opt.multi_objective_aggregation = g.multi_objective_aggregation;
    is_opt.mode = g.vllm_importance_sampling_mode;
    is_opt.max = g.vllm_importance_sampling_clip_max;
    if (g.vllm_importance_sampling_clip_min > 0) is_opt.min = g.vllm_importance_sampling_clip_min;
    std::vector<std::string> problems;
    for (auto& s : grpo_validate(loss_opt)) problems.push_back(s);
    for (auto& s : grpo_validate(adv_opt)) problems.push_back(s);
    for (auto& s : grpo_validate(is_opt)) problems.push_back(s);
    if (!problems.empty()) {
      std::string msg = "grpo recipe:";
      for (auto& s : problems) msg += "\n  " + s;
      throw Error(msg);
    }
    start_epoch();
  }

  int64_t rows() const { return train_set->num_rows(); }
  int64_t gens_per_epoch() const {
    const int64_t global = prompts_per_gen * world;
    return (rows() + global - 1) / global;
  }

  void start_epoch() {
    const int64_t n = rows();
    data::Permutation perm(static_cast<uint64_t>(n), mix64(static_cast<uint64_t>(r.run.seed) * 1000003ull + epoch));
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int64_t>(perm(static_cast<uint64_t>(i)));
    if (r.grpo.prompt_order == "variance_first" && epoch > 0) {
      // Highest variance first; unseen prompts (NaN) before all seen ones; ties keep the shuffle.
      auto key = [&](int64_t row) { return std::isnan(variance[row]) ? INFINITY : variance[row]; };
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
    }
  }

  // This rank's next `count` prompts (every rank advances by world * count global positions).
  std::vector<int64_t> next_rows(int64_t count) {
    if (pos >= rows()) {
      ++epoch;
      pos = 0;
      start_epoch();
    }
    std::vector<int64_t> out;
    for (int64_t j = 0; j < count; ++j) out.push_back(order[(pos + rank * count + j) % rows()]);
    pos += world * count;
    return out;
  }

  std::vector<Prompt> load_prompts(const data::PreparedSet& set, const std::vector<int64_t>& rows_) {
    auto batch = data::make_rl_batch(set, rows_);
    std::vector<Prompt> out;
    for (size_t i = 0; i < batch.size(); ++i) {
      Prompt p;
      p.row = rows_[i];
      p.ids.assign(batch[i].ids.begin(), batch[i].ids.end());
      p.answer = batch[i].answer;
      out.push_back(std::move(p));
    }
    return out;
  }

  // Samples G completions of each prompt and scores them (per-source rewards; NaN = none).
  std::vector<Completion> sample(const std::vector<Prompt>& prompts, uint64_t round_seed, double* gen_s,
                                 double* score_s, int64_t* gen_tokens) {
    const auto& g = r.grpo;
    std::vector<rollout::Request> reqs;
    for (size_t i = 0; i < prompts.size(); ++i) {
      rollout::Request q;
      q.prompt = prompts[i].ids;
      q.samples = G;
      q.sampling.temperature = g.temperature;
      q.sampling.top_p = g.top_p;
      q.sampling.top_k = g.top_k;
      q.seed = mix64(round_seed ^ mix64(static_cast<uint64_t>(prompts[i].row) + 1));
      q.max_new_tokens = g.max_completion_length;
      q.stop_ids = stop_ids;
      reqs.push_back(std::move(q));
    }
    auto t0 = Clock::now();
    auto res = engine->generate(reqs);
    engine->free_cache();
    *gen_s += seconds_since(t0);
    *gen_tokens += engine->last_stats().generated_tokens;
    auto t1 = Clock::now();
    std::vector<Completion> out;
    std::vector<std::string> queries, prompt_texts, labels;
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::string pt;
      if (client) {
        std::vector<tokenizer::TokenId> pids(prompts[i].ids.begin(), prompts[i].ids.end());
        pt = tok->decode(pids);
      }
      for (auto& s : res[i]) {
        Completion c;
        c.prompt = static_cast<int64_t>(i);
        c.ids = s.ids;
        c.sampler_logps = s.logprobs;
        c.truncated = s.finish_reason == rollout::FinishReason::kLength;
        std::vector<tokenizer::TokenId> ids(s.ids.begin(), s.ids.end());
        c.text = tok->decode(ids, /*skip_special=*/true);
        for (auto& f : reward_fns) c.rewards.push_back(f(c.text, prompts[i].answer));
        if (client) {
          // OpenRLHF's query is prompt + response with special tokens, as the policy saw it.
          std::vector<tokenizer::TokenId> ids(s.ids.begin(), s.ids.end());
          queries.push_back(pt + tok->decode(ids));
          prompt_texts.push_back(pt);
          labels.push_back(prompts[i].answer);
        }
        out.push_back(std::move(c));
      }
    }
    if (client) {
      reward::RewardResult rr;
      try {
        rr = client->score(queries, prompt_texts, labels);
      } catch (const std::exception& e) {
        throw Error(std::string("grpo: the reward servers (grpo.reward_urls) failed at generation batch ") +
                    std::to_string(generations + 1) + ": " + e.what() +
                    "\n---> HINT: start or fix the server, then rerun with resume=auto to continue from the "
                    "last checkpoint");
      }
      for (size_t i = 0; i < out.size(); ++i) out[i].rewards.push_back(rr.rewards.at(i));
      for (auto& [key, v] : rr.extra_logs) {
        double sum = 0;
        for (double x : v) sum += x;
        remote_logs[key].first += sum;
        remote_logs[key].second += static_cast<double>(v.size());
      }
    }
    *score_s += seconds_since(t1);
    return out;
  }

  static double combined(const Completion& c, const std::vector<double>& w) {
    double s = 0;
    bool any = false;
    for (size_t k = 0; k < c.rewards.size(); ++k)
      if (!std::isnan(c.rewards[k])) s += w[k] * c.rewards[k], any = true;
    return any ? s : std::nan("");
  }

  // Gathers a (n, C) float64 tensor over ranks (every rank the same n) -> (world * n, C).
  at::Tensor gather_rows(const at::Tensor& t) {
    if (world == 1) return t;
    return comm.all_gather(t.contiguous()).reshape({-1, t.size(1)});
  }

  // Records each prompt's group reward variance; rows and variances are gathered so every rank
  // keeps the same table.
  void record_variance(const std::vector<Prompt>& prompts, const std::vector<Completion>& comps) {
    const int64_t n = static_cast<int64_t>(prompts.size());
    auto t = torch::zeros({n, 2}, torch::kFloat64);
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> rs;
      for (int64_t j = 0; j < G; ++j) rs.push_back(combined(comps[i * G + j], weights));
      t[i][0] = static_cast<double>(prompts[i].row);
      t[i][1] = nan_var(rs);
    }
    auto all = gather_rows(t);
    auto a = all.accessor<double, 2>();
    for (int64_t i = 0; i < all.size(0); ++i) variance[static_cast<int64_t>(a[i][0])] = a[i][1];
  }

  static bool zero_std_group(const std::vector<Completion>& comps, int64_t first, int64_t G_,
                             const std::vector<double>& w) {
    std::vector<double> rs;
    for (int64_t j = 0; j < G_; ++j) rs.push_back(combined(comps[first + j], w));
    double v = nan_var(rs);
    return std::isnan(v) || std::sqrt(v) <= 1e-8;
  }

  void generate_batch() {
    const auto& g = r.grpo;
    auto gen = std::make_shared<GenBatch>();
    double gen_s = 0, score_s = 0;
    int64_t gen_tokens = 0;
    const int64_t step = generations * mu + 1;  // the first optimizer step trained on this batch
    int64_t rounds = 0, generated_groups = 0, kept_groups = 0, short_groups = 0;
    std::vector<Prompt> spare_prompts;
    std::vector<Completion> spare;
    remote_logs.clear();
    for (;;) {
      auto prompts = load_prompts(*train_set, next_rows(prompts_per_gen));
      // Seeds derive from (run.seed, generation batch, round, prompt row) only: resume regenerates
      // exactly, whatever the thread count or the other ranks.
      uint64_t round_seed = mix64(mix64(mix64(static_cast<uint64_t>(r.run.seed)) ^ static_cast<uint64_t>(generations)) ^
                                  static_cast<uint64_t>(rounds));
      auto comps = sample(prompts, round_seed, &gen_s, &score_s, &gen_tokens);
      ++rounds;
      generated_groups += static_cast<int64_t>(prompts.size());
      record_variance(prompts, comps);
      for (size_t i = 0; i < prompts.size(); ++i) {
        bool keep = !g.dynamic_sampling || !zero_std_group(comps, static_cast<int64_t>(i) * G, G, weights);
        auto& dst_p = keep ? gen->prompts : spare_prompts;
        auto& dst_c = keep ? gen->completions : spare;
        if (keep && static_cast<int64_t>(gen->prompts.size()) >= prompts_per_gen) continue;  // surplus: dropped
        if (keep) ++kept_groups;
        const int64_t idx = static_cast<int64_t>(dst_p.size());
        dst_p.push_back(prompts[i]);
        for (int64_t j = 0; j < G; ++j) {
          Completion c = std::move(comps[i * G + j]);
          c.prompt = idx;
          dst_c.push_back(std::move(c));
        }
      }
      if (!g.dynamic_sampling) break;
      // Every rank runs the same number of rounds (the next rounds' collectives must match).
      double short_here = static_cast<double>(prompts_per_gen - static_cast<int64_t>(gen->prompts.size()));
      double short_any = world > 1 ? comm.all_reduce(short_here, parallel::ReduceOp::kMax) : short_here;
      if (short_any <= 0 || rounds >= g.dynamic_sampling_max_rounds) break;
    }
    // Dynamic sampling that stayed short: top up with dropped (zero-advantage) groups.
    for (size_t i = 0; static_cast<int64_t>(gen->prompts.size()) < prompts_per_gen && i < spare_prompts.size(); ++i) {
      const int64_t idx = static_cast<int64_t>(gen->prompts.size());
      gen->prompts.push_back(spare_prompts[i]);
      for (int64_t j = 0; j < G; ++j) {
        Completion c = spare[i * G + j];
        c.prompt = idx;
        gen->completions.push_back(std::move(c));
      }
      ++short_groups;
    }
    PTK_CHECK(static_cast<int64_t>(gen->prompts.size()) == prompts_per_gen, "generation batch has the wrong size");
    // Rewards → advantages over the global batch.
    const int64_t n = static_cast<int64_t>(gen->completions.size());
    const int64_t S = static_cast<int64_t>(source_names.size());
    auto local = torch::empty({n, S + 2}, torch::kFloat64);
    {
      auto a = local.accessor<double, 2>();
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t k = 0; k < S; ++k) a[i][k] = gen->completions[i].rewards[k];
        a[i][S] = static_cast<double>(gen->completions[i].ids.size());
        a[i][S + 1] = gen->completions[i].truncated ? 1 : 0;
      }
    }
    auto all = gather_rows(local);
    auto adv = grpo_advantages(all.slice(1, 0, S), adv_opt, source_names);
    auto my_adv = adv.advantages.slice(0, rank * n, (rank + 1) * n);
    auto my_R = adv.rewards.slice(0, rank * n, (rank + 1) * n);
    for (int64_t i = 0; i < n; ++i) {
      gen->completions[i].advantage = my_adv[i].item<double>();
      gen->completions[i].reward = my_R[i].item<double>();
    }
    // Metrics of the generation batch (the same on every rank).
    Metrics& m = gen->metrics;
    for (auto& [k, v] : grpo_completion_metrics(all.select(1, S), all.select(1, S + 1).to(torch::kBool))) m.add(k, v);
    for (auto& [k, v] : adv.metrics) m.add(k, v);
    double gen_all = gen_s, score_all = score_s, tok_all = static_cast<double>(gen_tokens);
    if (world > 1) {
      gen_all = comm.all_reduce(gen_s, parallel::ReduceOp::kMax);
      score_all = comm.all_reduce(score_s, parallel::ReduceOp::kMax);
      tok_all = comm.all_reduce(tok_all, parallel::ReduceOp::kSum);
    }
    m.add("time/generate_s", gen_all).add("time/score_s", score_all);
    m.add("generation/tokens_per_s", gen_all > 0 ? tok_all / gen_all : 0.0);
    if (g.dynamic_sampling) {
      double sums[3] = {static_cast<double>(generated_groups), static_cast<double>(kept_groups),
                        static_cast<double>(short_groups)};
      if (world > 1)
        for (double& x : sums) x = comm.all_reduce(x, parallel::ReduceOp::kSum);
      m.add("dynamic_sampling/rounds", static_cast<double>(rounds));
      m.add("dynamic_sampling/kept_group_ratio", sums[1] / std::max(1.0, sums[0]));
      m.add("dynamic_sampling/short_groups", sums[2]);
    }
    // The servers' per-source values (extra_logs), e.g. rewards/remote/rm/mean; keys in sorted order
    // on every rank (a key one rank lacks would desynchronize the all-reduce, so gather over ranks).
    for (auto& [key, sc] : remote_logs) {
      double s2[2] = {sc.first, sc.second};
      if (world > 1)
        for (double& x : s2) x = comm.all_reduce(x, parallel::ReduceOp::kSum);
      m.add("rewards/remote/" + key + "/mean", s2[1] > 0 ? s2[0] / s2[1] : std::nan(""));
    }
    // Shuffle (TRL shuffles the generation batch before cutting micro-batches), then cut.
    gen->order.resize(n);
    std::iota(gen->order.begin(), gen->order.end(), 0);
    std::mt19937_64 rng(mix64(static_cast<uint64_t>(r.run.seed) + 7919ull * (generations + 1) + rank));
    for (int64_t i = n - 1; i > 0; --i) std::swap(gen->order[i], gen->order[rng() % (i + 1)]);
    const int64_t B = r.train.micro_batch_size;
    std::vector<std::shared_ptr<Slice>> slices;
    std::vector<int64_t> micro_batch_of(n);
    for (int64_t k = 0; k < K; ++k) {
      std::vector<int64_t> rows_(gen->order.begin() + k * B, gen->order.begin() + (k + 1) * B);
      for (int64_t i : rows_) micro_batch_of[i] = k;
      slices.push_back(make_slice(gen, rows_));
    }
    // The reference phase: every slice's reference log-probs, before the update (the reference is
    // frozen, so they are the values pass 0 of each micro-batch would compute).
    if (has_ref) {
      const auto t_ref = Clock::now();
      reference_pass(slices);
      double ref_s = seconds_since(t_ref);
      if (world > 1) ref_s = comm.all_reduce(ref_s, parallel::ReduceOp::kMax);
      m.add("time/reference_s", ref_s);
    }
    // Rollouts file.
    if (g.log_rollouts_every > 0 && generations % g.log_rollouts_every == 0)
      write_rollouts(*gen, micro_batch_of, step);
    buffer.clear();
    buffer_next = 0;
    for (int64_t p = 0; p < mu; ++p) {
      for (int64_t k = 0; k < K; ++k) {
        buffer.push_back({slices[k], p, p == 0 && k == 0, k == K - 1});
      }
    }
    ++generations;
  }

  std::shared_ptr<Slice> make_slice(const std::shared_ptr<GenBatch>& gen, const std::vector<int64_t>& rows_) {
    auto s = std::make_shared<Slice>();
    s->gen = gen;
    s->rows = rows_;
    const int64_t B = static_cast<int64_t>(rows_.size());
    int64_t L = 1, Tc = 1;
    for (int64_t i : rows_) {
      const auto& c = gen->completions[i];
      const auto& p = gen->prompts[c.prompt];
      L = std::max<int64_t>(L, p.ids.size() + c.ids.size());
      Tc = std::max<int64_t>(Tc, c.ids.size());
    }
    std::vector<int64_t> ids(B * L, pad_id), am(B * L, 0), cids(B * Tc, pad_id), src, dst;
    std::vector<float> mask(B * Tc, 0.f), slp(B * Tc, 0.f), advs(B);
    for (int64_t b = 0; b < B; ++b) {
      const auto& c = gen->completions[rows_[b]];
      const auto& p = gen->prompts[c.prompt];
      const int64_t lp = static_cast<int64_t>(p.ids.size()), lc = static_cast<int64_t>(c.ids.size());
      s->prompt_lengths.push_back(lp);
      s->row_spans.emplace_back(0, lp + lc);
      for (int64_t t = 0; t < lp; ++t) ids[b * L + t] = p.ids[t], am[b * L + t] = 1;
      const bool masked = r.grpo.mask_truncated_completions && c.truncated;
      for (int64_t t = 0; t < lc; ++t) {
        ids[b * L + lp + t] = c.ids[t];
        am[b * L + lp + t] = 1;
        cids[b * Tc + t] = c.ids[t];
        mask[b * Tc + t] = masked ? 0.f : 1.f;
        slp[b * Tc + t] = c.sampler_logps[t];
        src.push_back(b * L + lp - 1 + t);  // hidden at t-1 scores token t
        dst.push_back(b * Tc + t);
      }
      if (!masked) s->active_tokens += lc;
      s->tokens += lp + lc;
      advs[b] = static_cast<float>(c.advantage);
    }
    // Built on the host, moved to the policy's device once (train::to_device).
    auto i64 = torch::TensorOptions().dtype(torch::kInt64);
    auto on = [&](const at::Tensor& t) { return train::to_device(t, p.device); };
    s->input_ids = on(torch::tensor(ids, i64).view({B, L}));
    s->attention_mask = on(torch::tensor(am, i64).view({B, L}));
    s->completion_ids = on(torch::tensor(cids, i64).view({B, Tc}));
    s->mask = on(torch::tensor(mask).view({B, Tc}));
    s->sampler_logps = on(torch::tensor(slp).view({B, Tc}));
    s->advantages = on(torch::tensor(advs));
    s->gather_src = on(torch::tensor(src, i64));
    s->gather_dst = on(torch::tensor(dst, i64));
    return s;
  }

  // Fills each slice's ref_logps (no gradients). With the reference in host memory: copies it to the
  // policy's device (asynchronously from pinned memory, ordered before the forwards on the current
  // stream), runs the slices, and drops the device copy (its blocks go back to the caching allocator
  // for the update; the stream order makes that safe without a sync). Ends with one device sync on
  // CUDA so the phase's time is its own.
  void reference_pass(const std::vector<std::shared_ptr<Slice>>& slices) {
    torch::NoGradGuard ng;
    model::Qwen2Model ref = reference;  // a handle; with ref_on_host a copy on the policy's device
    if (ref_on_host) {
      ref = reference.map_weights(
          [&](const at::Tensor& t) { return t.to(p.device, t.scalar_type(), /*non_blocking=*/true); });
      ++reference_uploads;
    }
    for (const auto& s : slices) s->ref_logps = token_logprobs(ref, *s).first;
    sync_for_timing(p.device);
  }

  // ℓ and H of every completion token, (B, Tc) each (0 at padding), for `m` (policy or reference).
  std::pair<at::Tensor, at::Tensor> token_logprobs(const model::Qwen2Model& m, const Slice& s) const {
    model::ForwardInput in;
    in.input_ids = s.input_ids;
    in.attention_mask = s.attention_mask;
    in.row_spans = s.row_spans;
    model::ForwardOptions fo;
    fo.logits = false;
    fo.activation_checkpointing = r.model.activation_checkpointing;  // only where gradients are taken
    auto out = m.forward(in, fo);
    const int64_t B = s.input_ids.size(0), Tc = s.completion_ids.size(1);
    auto h = out.hidden.reshape({-1, out.hidden.size(-1)}).index_select(0, s.gather_src);  // (N, H)
    model::LogProbOptions lo;
    lo.temperature = r.grpo.temperature;
    auto targets = s.completion_ids.reshape({-1}).index_select(0, s.gather_dst);
    auto tl = model::lm_head_logprobs(h, m.lm_head_weight(), targets, lo);
    auto zeros = torch::zeros({B * Tc}, tl.logprobs.options().dtype(torch::kFloat32));
    auto lp = zeros.index_copy(0, s.gather_dst, tl.logprobs).view({B, Tc});
    auto ent = zeros.index_copy(0, s.gather_dst, tl.entropy.detach()).view({B, Tc});
    return {lp, ent};
  }

  train::LossOut loss(const MbData& d, double step_targets) {
    Slice& s = *d.slice;
    auto [logps, entropy] = token_logprobs(policy, s);
    GrpoMicroBatch b;
    b.logps = logps;
    b.entropy = entropy;
    b.mask = s.mask;
    b.advantages = s.advantages;
    train::LossOut out;
    if (d.pass == 0) {
      // Pass 0 runs before any update of this generation batch: the detached ℓ IS ℓ^old.
      s.old_logps = logps.detach();
      PTK_CHECK(!has_ref || s.ref_logps.defined(), "grpo: a micro-batch reached the loss without its reference pass");
      if (r.grpo.vllm_importance_sampling_correction) {
        auto w = grpo_importance_weights(s.old_logps, s.sampler_logps, s.mask, is_opt, /*read_metrics=*/false);
        s.is_weights = w.weights;
        s.is_metrics = w.read_metrics;
      }
    } else {
      b.old_logps = s.old_logps;
    }
    b.ref_logps = s.ref_logps;
    b.is_weights = s.is_weights;
    GrpoScaling sc;
    if (loss_opt.loss_type == "dapo" || loss_opt.loss_type == "cispo") {
      // step_targets = Σ m over every micro-batch and rank of this step = the generation batch's N.
      // The loop sums gradients over ranks, so P = 1 here.
      sc.num_items_in_batch = std::max(1.0, step_targets);
    } else {
      // TRL divides by K and DDP averages over P; the loop sums over ranks, so divide by K·P.
      sc.accumulation_steps = K * world;
    }
    auto res = grpo_loss(b, loss_opt, sc, /*read_metrics=*/false);
    out.loss = res.loss;
    b.logps = b.logps.detach();  // tests need the values, not the graph
    last = GrpoLossInputs{b, loss_opt, sc, s.input_ids, s.attention_mask, s.completion_ids, s.prompt_lengths, d.pass};
    // Metrics, read back after the step (LossOut::read_back): generation metrics once per generation
    // batch; per-micro-batch gmeans as ratios.
    std::shared_ptr<GenBatch> gen = d.first_of_generation ? s.gen : nullptr;
    std::function<NamedValues()> is_metrics = d.pass == 0 ? s.is_metrics : nullptr;
    // The update phase ends at the step's one read, which runs the last micro-batch's read_back
    // after every backward and the clipping (AdamW comes after it, outside).
    const bool last_of_step = d.last_of_step;
    const Clock::time_point t_update = update_t0;
    out.read_back = [gen, is_metrics, last_of_step, t_update, read = std::move(res.read_metrics)](train::LossOut& o) {
      if (last_of_step) o.metrics.add("time/update_s", seconds_since(t_update));
      if (gen)
        for (auto& [k, v] : gen->metrics.values()) o.metrics.add(k, v);
      if (is_metrics)
        for (auto& [k, v] : is_metrics()) o.metrics.add(k, v);
      const GrpoLossMetricSums ms = read();
      if (ms.has_kl) o.ratios.push_back({"kl", ms.kl_sum, ms.tokens});
      if (ms.has_entropy) o.ratios.push_back({"entropy", ms.entropy_sum, ms.tokens});
      if (ms.has_clip) {
        o.ratios.push_back({"clip_ratio/low_mean", ms.clip_low_sum, ms.clip_count});
        o.ratios.push_back({"clip_ratio/high_mean", ms.clip_high_sum, ms.clip_count});
        o.ratios.push_back({"clip_ratio/region_mean", ms.clip_region_sum, ms.clip_count});
        // min/max over ranks are averaged by the loop (exact with one rank).
        o.metrics.add("clip_ratio/low_min", ms.clip_low_min).add("clip_ratio/high_max", ms.clip_high_max);
      }
      if (ms.has_cispo) o.ratios.push_back({"cispo_clip_ratio", ms.cispo_clip_sum, ms.tokens});
    };
    return out;
  }

  // rollouts/step-N.jsonl (rank r > 0: step-N.rank-r.jsonl): one line per completion of this rank's
  // generation batch, groups of G consecutive lines (format in grpo_stage.h). `micro_batch_of`: the
  // micro-batch (0 .. grad_accum-1) each completion was cut into.
  void write_rollouts(const GenBatch& gen, const std::vector<int64_t>& micro_batch_of, int64_t step) {
    make_dirs(run_dir + "/rollouts");
    std::string name = run_dir + "/rollouts/step-" + std::to_string(step) +
                       (rank == 0 ? std::string() : ".rank-" + std::to_string(rank)) + ".jsonl";
    rapidjson::StringBuffer buf;
    for (size_t i = 0; i < gen.completions.size(); ++i) {
      const auto& c = gen.completions[i];
      const auto& p = gen.prompts[c.prompt];
      rapidjson::Writer<rapidjson::StringBuffer> w(buf);
      std::vector<tokenizer::TokenId> pids(p.ids.begin(), p.ids.end());
      w.StartObject();
      w.Key("step");
      w.Int64(step);
      w.Key("row");
      w.Int64(p.row);
      w.Key("prompt");
      std::string pt = tok->decode(pids);
      w.String(pt.c_str(), static_cast<rapidjson::SizeType>(pt.size()));
      w.Key("completion");
      w.String(c.text.c_str(), static_cast<rapidjson::SizeType>(c.text.size()));
      w.Key("answer");
      w.String(p.answer.c_str(), static_cast<rapidjson::SizeType>(p.answer.size()));
      w.Key("rewards");
      w.StartObject();
      for (size_t k = 0; k < source_names.size(); ++k) {
        w.Key(source_names[k].c_str());
        if (std::isnan(c.rewards[k])) w.Null();
        else w.Double(c.rewards[k]);
      }
      w.EndObject();
      w.Key("reward");
      if (std::isnan(c.reward)) w.Null();
      else w.Double(c.reward);
      w.Key("advantage");
      w.Double(c.advantage);
      w.Key("length");
      w.Int64(static_cast<int64_t>(c.ids.size()));
      w.Key("finish_reason");
      w.String(c.truncated ? "length" : "stop");
      w.Key("prompt_length");
      w.Int64(static_cast<int64_t>(p.ids.size()));
      w.Key("micro_batch");
      w.Int64(micro_batch_of[i]);
      w.EndObject();
      buf.Put('\n');
    }
    write_file_atomic(name, std::string(buf.GetString(), buf.GetSize()));
  }

  void evaluate_accuracy(Metrics* out) {
    if (!eval_set) return;
    const auto& g = r.grpo;
    int64_t n = eval_set->num_rows();
    if (g.eval_max_prompts > 0) n = std::min(n, g.eval_max_prompts);
    std::vector<int64_t> mine;
    for (int64_t i = rank; i < n; i += world) mine.push_back(i);
    auto prompts = load_prompts(*eval_set, mine);
    // Scored by `ptk eval`'s code (eval::evaluate: the engine, the same stop ids, the verifier).
    std::vector<eval::EvalPrompt> eval_prompts;
    std::vector<uint64_t> seeds;
    for (const auto& p : prompts) {
      eval::EvalPrompt e;
      e.ids = p.ids;
      e.answer = p.answer;
      e.where = "data.eval row " + std::to_string(p.row);
      eval_prompts.push_back(std::move(e));
      // Fixed per held-out row (not per eval, not per rank): successive evals score the same draws.
      seeds.push_back(mix64(mix64(static_cast<uint64_t>(r.run.seed) ^ 0x65766121ull) ^ static_cast<uint64_t>(p.row)));
    }
    // One pass: `samples` completions per prompt, greedy (temperature 0) or sampled as in training;
    // the figures over every rank's prompts.
    auto score = [&](int64_t samples, bool greedy) {
      eval::EvalOptions eo;
      eo.verifier = g.eval_verifier;
      eo.max_new_tokens = g.eval_max_new_tokens > 0 ? g.eval_max_new_tokens : g.max_completion_length;
      eo.samples = samples;
      eo.slots = r.rollout.slots;
      eo.engine = engine_options(r.rollout);
      if (!greedy) {
        eo.sampling = rollout::SamplingParams{g.temperature, g.top_p, g.top_k};
        eo.prompt_seeds = seeds;
      }
      engine->free_cache();  // evaluate() brings its own engine and cache
      engine->drop_packed();  // and its own packed copies (keep_packed: one copy at a time; repacked after)
      return eval::evaluate_across_ranks(policy, *tok, eval_prompts, eo, &comm);
    };
    auto greedy = score(1, true);
    if (greedy.samples == 0) return;
    out->add("accuracy", greedy.accuracy);
    out->add("completions/mean_length", greedy.mean_length);
    if (g.eval_num_samples > 0) out->add("sampled_accuracy", score(g.eval_num_samples, false).accuracy);
  }

  std::string cursor_json() const {
    if (buffer_next < buffer.size())
      throw Error("grpo: a checkpoint was requested in the middle of a generation batch (" +
                  std::to_string(buffer.size() - buffer_next) + " micro-batches left)\n---> HINT: make "
                  "checkpoint.every a multiple of grpo.num_iterations");
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    w.StartObject();
    w.Key("epoch");
    w.Int64(epoch);
    w.Key("pos");
    w.Int64(pos);
    w.Key("generations");
    w.Int64(generations);
    w.Key("rows");
    w.Int64(rows());
    w.Key("world_size");
    w.Int(world);
    w.Key("prompts_per_generation");
    w.Int64(prompts_per_gen);
    w.Key("data");
    std::string fp = train_set->fingerprint();
    w.String(fp.c_str(), static_cast<rapidjson::SizeType>(fp.size()));
    if (r.grpo.prompt_order == "variance_first") {
      w.Key("variance");  // per row; null = unseen
      w.StartArray();
      for (double x : variance) {
        if (std::isnan(x)) w.Null();
        else w.Double(x);
      }
      w.EndArray();
      // This epoch's order: it was sorted by the variances at the epoch's start, which this
      // epoch's visits have since changed, so start_epoch() cannot recompute it from `variance`.
      w.Key("order");
      w.StartArray();
      for (int64_t row : order) w.Int64(row);
      w.EndArray();
    }
    w.EndObject();
    return std::string(buf.GetString(), buf.GetSize());
  }

  void restore_cursor(const std::string& j) {
    auto d = json::parse(j, "grpo cursor");
    if (d["rows"].GetInt64() != rows() || std::string(d["data"].GetString()) != train_set->fingerprint())
      throw Error("grpo: the checkpoint was written for other prompts (" + std::to_string(d["rows"].GetInt64()) +
                  " rows, data " + d["data"].GetString() + "); data.train now has " + std::to_string(rows()) +
                  "\n---> HINT: resume=never to start over with the new data");
    if (d["world_size"].GetInt() * d["prompts_per_generation"].GetInt64() != world * prompts_per_gen)
      log::warn("grpo: the checkpoint used " + std::to_string(d["world_size"].GetInt()) + " ranks x " +
                std::to_string(d["prompts_per_generation"].GetInt64()) +
                " prompts per generation; this run differs, so the prompt order differs from the original run");
    epoch = d["epoch"].GetInt64();
    pos = d["pos"].GetInt64();
    generations = d["generations"].GetInt64();
    if (d.HasMember("variance")) {
      auto& a = d["variance"];
      for (rapidjson::SizeType i = 0; i < a.Size() && i < variance.size(); ++i)
        variance[i] = a[i].IsNull() ? std::nan("") : a[i].GetDouble();
    }
    start_epoch();
    if (d.HasMember("order")) {  // variance_first: the saved order (checkpoints before it: recomputed)
      auto& a = d["order"];
      PTK_CHECK(a.IsArray() && static_cast<int64_t>(a.Size()) == rows(),
                "grpo cursor: \"order\" must list the " + std::to_string(rows()) + " rows");
      for (rapidjson::SizeType i = 0; i < a.Size(); ++i) {
        PTK_CHECK(a[i].IsInt64() && a[i].GetInt64() >= 0 && a[i].GetInt64() < rows(),
                  "grpo cursor: \"order\" holds a row outside 0.." + std::to_string(rows() - 1));
        order[i] = a[i].GetInt64();
      }
    }
    buffer.clear();
    buffer_next = 0;
  }
};

GrpoStage::GrpoStage(GrpoRecipe& recipe, const std::string& run_dir, parallel::Comm comm,
                     std::vector<RewardFunction> extra_rewards)
    : impl_(std::make_unique<Impl>(recipe, run_dir, std::move(comm), std::move(extra_rewards))) {}
GrpoStage::~GrpoStage() = default;

void GrpoStage::set_rank(int rank, int world_size) {
  impl_->rank = rank;
  impl_->world = world_size;
  impl_->start_epoch();
}
optim::NamedTensors GrpoStage::parameters() { return train::trainable_parameters(impl_->p); }
int64_t GrpoStage::micro_batches_per_epoch() const { return impl_->gens_per_epoch() * impl_->K * impl_->mu; }
MbData GrpoStage::next_batch(int64_t* targets, int64_t* tokens) {
  auto& s = *impl_;
  if (s.buffer_next >= s.buffer.size()) s.generate_batch();
  if (s.buffer_next % static_cast<size_t>(s.K) == 0) s.update_t0 = Clock::now();  // a step's first micro-batch
  const MbData& d = s.buffer[s.buffer_next++];
  *targets = d.slice->active_tokens;
  *tokens = d.slice->tokens;
  return d;
}
std::string GrpoStage::cursor_json() const { return impl_->cursor_json(); }
void GrpoStage::restore_cursor(const std::string& json) { impl_->restore_cursor(json); }
train::LossOut GrpoStage::batch_loss(const MbData& d, double n) { return impl_->loss(d, n); }
void GrpoStage::evaluate(Metrics* out) {
  torch::NoGradGuard ng;
  impl_->evaluate_accuracy(out);
}
void GrpoStage::evaluate_accuracy(Metrics* out) {
  torch::NoGradGuard ng;
  impl_->evaluate_accuracy(out);
}
void GrpoStage::save_model(const std::string& dir) { train::save_policy_model(impl_->policy, impl_->p, impl_->r, dir); }
void GrpoStage::after_final(const std::string& run_dir) { train::save_merged_final(impl_->p, impl_->r, run_dir); }
double GrpoStage::frozen_bytes() const { return train::frozen_bytes(impl_->p); }
const rollout::Stats& GrpoStage::last_rollout_stats() const { return impl_->engine->last_stats(); }
train::MicroBatch GrpoStage::prepared_micro_batch(const std::vector<std::vector<int64_t>>& prompts,
                                                  const std::vector<std::vector<int64_t>>& completions,
                                                  const std::vector<double>& advantages) {
  PTK_CHECK(prompts.size() == completions.size() && prompts.size() == advantages.size() && !prompts.empty(),
            "prepared_micro_batch: one prompt, completion and advantage per row");
  auto gen = std::make_shared<GenBatch>();
  std::vector<int64_t> rows;
  for (size_t i = 0; i < prompts.size(); ++i) {
    Prompt pr;
    pr.row = static_cast<int64_t>(i);
    pr.ids = prompts[i];
    gen->prompts.push_back(std::move(pr));
    Completion c;
    c.prompt = static_cast<int64_t>(i);
    c.ids = completions[i];
    c.sampler_logps.assign(completions[i].size(), 0.f);
    c.advantage = advantages[i];
    gen->completions.push_back(std::move(c));
    rows.push_back(static_cast<int64_t>(i));
  }
  auto slice = impl_->make_slice(gen, rows);
  if (impl_->has_ref) impl_->reference_pass({slice});
  auto d = std::make_shared<MbData>(MbData{slice, 0, false, false});
  return {d, slice->active_tokens, slice->tokens, &typeid(MbData)};
}

bool GrpoStage::has_reference() const { return impl_->has_ref; }
bool GrpoStage::reference_on_host() const { return impl_->ref_on_host; }
int64_t GrpoStage::reference_uploads() const { return impl_->reference_uploads; }
optim::NamedTensors GrpoStage::reference_parameters() const {
  return impl_->has_ref ? impl_->reference.named_parameters() : optim::NamedTensors{};
}
const model::Qwen2Model& GrpoStage::policy() const { return impl_->policy; }
const GrpoLossInputs& GrpoStage::last_loss_inputs() const { return impl_->last; }

void add_memory_plan(const GrpoRecipe& r, train::MemoryPlan* plan) {
  plan->live_reference = r.grpo.beta != 0 && !r.lora.enabled;  // LoRA: the adapters-off policy, no copy
  plan->reference_on_host = plan->live_reference && r.grpo.reference_device == "host";
  plan->completion_len = r.grpo.max_completion_length;
  plan->slots = r.rollout.slots;
}

std::string run_grpo(GrpoRecipe& r, const std::string& recipe_file, const std::string& resolved) {
  std::string run_dir = train::run_dir_of(r, recipe_file);  // made by trainer_options, after the rerun check
  torch::manual_seed(static_cast<uint64_t>(r.run.seed));
  auto opts = train::trainer_options(r, run_dir, resolved, "grpo");
  if (auto plan = train::memory_plan_from_recipe(r, train::StageKind::kGrpo)) {
    add_memory_plan(r, &*plan);
    train::check_memory_estimate(r, *plan, opts.comm);  // before the models, engine or data exist
  }
  GrpoStage stage(r, run_dir, opts.comm);
  train::Trainer trainer(stage, opts);
  const bool main = opts.comm.rank() == 0;
  if (main)
    log::info("grpo: " + std::to_string(trainer.total_steps()) + " optimizer steps; each generation batch is " +
              std::to_string(r.train.micro_batch_size * r.train.grad_accum / r.grpo.num_generations) + " prompts x " +
              std::to_string(r.grpo.num_generations) + " samples per rank, trained for " +
              std::to_string(r.grpo.num_iterations) + " step(s); run folder " + run_dir);
  const bool fresh = train::is_fresh_run(r, run_dir);
  if (r.grpo.eval_at_start && fresh && data::has_eval_data(r.data)) {
    Metrics m;
    auto t0 = Clock::now();
    stage.evaluate_accuracy(&m);
    std::string line = "grpo: before training, held-out";
    for (auto& [k, v] : m.values()) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " %s %.4f", k.c_str(), v);
      line += buf;
    }
    if (main) {
      log::info(line + " (" + std::to_string(seconds_since(t0)) + " s)");
      eval::write_eval_start(run_dir, m);
    }
  }
  trainer.run();
  return run_dir;
}

}  // namespace ptk::rl
