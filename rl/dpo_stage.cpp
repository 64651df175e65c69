#include "rl/dpo_stage.h"

#include <sys/stat.h>
#include <unistd.h>
#include <torch/torch.h>

#include <functional>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>

#include "core/checkpoint/adapter_config.h"
#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/model_folder.h"
#include "core/model/lm_head_logprobs.h"
#include "core/runtime/log.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/from_recipe.h"
#include "core/train/stage_setup.h"
#include "core/train/progress.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "datasets/prepare.h"

namespace ptk::rl {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Recipe section

void DpoSection::visit(config::Visitor& v) {
  v.choice(algorithm, "algorithm", "dpo", {"dpo", "cpo"},
           "dpo: DPOTrainer's losses against a frozen reference; cpo: CPOTrainer's (SimPO with loss_type=simpo), "
           "no reference model (less memory and no reference pass)");
  v.opt(loss_type, "loss_type", {"sigmoid"},
        "dpo: sigmoid|hinge|ipo|robust|sft|sigmoid_norm, one name or a list summed with loss_weights; "
        "cpo: one of sigmoid|hinge|ipo|simpo");
  v.opt(loss_weights, "loss_weights", {}, "one weight per loss_type entry (dpo); empty = all 1.0");
  v.opt(beta, "beta", 0.1, "KL strength / reward scale: higher keeps the policy nearer the reference "
                           "(SimPO's paper uses 2.0-2.5)");
  v.opt(label_smoothing, "label_smoothing", 0.0,
        "assumed label-noise rate in [0, 0.5): dpo robust only; cpo sigmoid/simpo");
  v.opt(simpo_gamma, "simpo_gamma", 0.5, "cpo simpo: target reward margin gamma");
  v.opt(cpo_alpha, "cpo_alpha", 1.0, "cpo: weight of the chosen NLL; 1.0 = CPO-SimPO, 0.0 = pure SimPO");
  v.opt(ld_alpha, "ld_alpha", 1.0,
        "dpo: LD-DPO weight in [0, 1] of the reply tokens past the shorter reply, in the policy's and the reference's sums "
        "(not the sft term's); 1.0 = plain sums");
  v.opt(ref_path, "ref_path", "",
        "dpo: HF folder (or PEFT adapter folder) of the frozen reference; \"\" = model.path (the policy's starting "
        "point; with model.lora.enabled, the policy with its adapters switched off: no second copy)");
  v.choice(precompute_ref_log_probs, "precompute_ref_log_probs", "auto", {"auto", "true", "false"},
           "dpo: true = compute reference log-probs once (data.train and data.eval) and cache them beside the "
           "prepared shards (keyed by reference checkpoint + data), then free the reference; false = a live "
           "reference forward each micro-batch and eval (TRL's default; keeps a second model in memory); auto = "
           "precompute when that costs no more reference forwards than the run would do live: a valid cache "
           "exists, or train.max_steps x grad_accum x micro_batch_size x ranks + data.eval pairs x evals >= "
           "data.train + data.eval pairs (a run of at least about one epoch), or the memory estimate leaves no "
           "room for a live reference; otherwise live. A run folder may switch between them on resume (the same "
           "numbers up to float rounding)");
  v.opt(precompute_ref_batch_size, "precompute_ref_batch_size", 8, "pairs per forward of the reference pass");
  v.opt(eval_micro_batch_size, "eval_micro_batch_size", 8, "pairs per forward for the eval metrics (data.eval)");
  heldout.visit(v);
}

void DpoSection::validate(config::Errors& e) const {
  heldout.validate(e, "dpo");
  auto prefixed = [&](const std::vector<std::string>& errors) {
    for (auto& m : errors) e.add("dpo." + m);
  };
  if (!(ld_alpha >= 0 && ld_alpha <= 1)) e.add("dpo.ld_alpha = " + std::to_string(ld_alpha) + " must be in [0, 1]");
  if (precompute_ref_batch_size < 1) e.add("dpo.precompute_ref_batch_size must be >= 1");
  if (eval_micro_batch_size < 1) e.add("dpo.eval_micro_batch_size must be >= 1");
  if (!is_cpo()) {
    if (std::find(loss_type.begin(), loss_type.end(), "simpo") != loss_type.end()) {
      e.add("dpo.loss_type \"simpo\" is a CPO-trainer loss (no reference model)\n---> HINT: set dpo.algorithm=cpo "
            "(and dpo.cpo_alpha=0 for pure SimPO)");
      return;
    }
    prefixed(dpo_validate(dpo_options()));
    return;
  }
  if (loss_type.size() != 1) {
    e.add("dpo.loss_type has " + std::to_string(loss_type.size()) +
          " entries; with dpo.algorithm=cpo give exactly one of sigmoid, hinge, ipo, simpo");
  } else {
    prefixed(cpo_validate(cpo_options()));
  }
  if (!loss_weights.empty()) e.add("dpo.loss_weights is for dpo.algorithm=dpo's loss lists; remove it with cpo");
  if (ld_alpha != 1.0) e.add("dpo.ld_alpha = " + std::to_string(ld_alpha) + " applies to dpo.algorithm=dpo only");
  if (!ref_path.empty())
    e.add("dpo.ref_path = \"" + ref_path + "\" but dpo.algorithm=cpo loads no reference; remove dpo.ref_path");
}

DpoLossOptions DpoSection::dpo_options() const {
  DpoLossOptions o;
  o.loss_type = loss_type;
  o.loss_weights = loss_weights;
  o.beta = beta;
  o.label_smoothing = label_smoothing;
  return o;
}

CpoLossOptions DpoSection::cpo_options() const {
  CpoLossOptions o;
  o.loss_type = loss_type.empty() ? std::string() : loss_type[0];
  o.beta = beta;
  o.simpo_gamma = simpo_gamma;
  o.cpo_alpha = cpo_alpha;
  o.label_smoothing = label_smoothing;
  return o;
}

std::optional<double> DpoSection::ld() const {
  if (ld_alpha == 1.0) return std::nullopt;
  return ld_alpha;
}

// ---------------------------------------------------------------------------------------------
// Batches and sequence scores

PairBatch make_pair_batch(const std::vector<data::PairView>& pairs, std::vector<int64_t> rows, int32_t pad_id) {
  const int64_t P = static_cast<int64_t>(pairs.size());
  PTK_CHECK(P > 0, "make_pair_batch: no pairs");
  int64_t T = 1;
  for (auto& p : pairs) T = std::max<int64_t>(T, p.prompt.size + std::max(p.chosen.size, p.rejected.size));
  std::vector<int64_t> ids(2 * P * T, pad_id), att(2 * P * T, 0);
  std::vector<float> cm(2 * P * T, 0.f), n(2 * P, 0.f);
  PairBatch b;
  for (int64_t i = 0; i < 2 * P; ++i) {
    const data::PairView& p = pairs[i % P];
    const data::Span<uint32_t>& reply = i < P ? p.chosen : p.rejected;
    const int64_t lp = static_cast<int64_t>(p.prompt.size), lr = static_cast<int64_t>(reply.size);
    int64_t* row = ids.data() + i * T;
    for (int64_t t = 0; t < lp; ++t) row[t] = p.prompt[t];
    for (int64_t t = 0; t < lr; ++t) row[lp + t] = reply[t];
    for (int64_t t = 0; t < lp + lr; ++t) att[i * T + t] = 1;
    // Token t is scored by the logits at t-1, so a reply starting at position 0 loses its first token.
    for (int64_t t = std::max<int64_t>(lp, 1); t < lp + lr; ++t) cm[i * T + t] = 1.f;
    n[i] = static_cast<float>(lr);
    b.tokens += lp + lr;
  }
  b.ids = torch::tensor(ids, torch::kInt64).view({2 * P, T});
  b.attention_mask = torch::tensor(att, torch::kInt64).view({2 * P, T});
  b.completion_mask = torch::tensor(cm, torch::kFloat32).view({2 * P, T});
  b.completion_tokens = torch::tensor(n, torch::kFloat32);
  b.rows = std::move(rows);
  b.row_index = torch::tensor(b.rows, torch::kInt64);
  b.target_index = b.completion_mask.reshape(-1).nonzero().squeeze(1);  // host: no device read later
  for (int64_t i = 0; i < 2 * P; ++i) {
    const data::PairView& p = pairs[i % P];
    b.row_spans.emplace_back(0, static_cast<int64_t>(p.prompt.size) + static_cast<int64_t>((i < P ? p.chosen : p.rejected).size));
  }
  b.chosen_targets = b.completion_mask.slice(0, 0, P).sum().item<int64_t>();  // host tensor
  return b;
}

PairBatch to_device(const PairBatch& h, const at::Device& device) {
  PairBatch b = h;
  b.ids = train::to_device(h.ids, device);
  b.attention_mask = train::to_device(h.attention_mask, device);
  b.completion_mask = train::to_device(h.completion_mask, device);
  b.completion_tokens = train::to_device(h.completion_tokens, device);
  b.target_index = train::to_device(h.target_index, device);
  b.row_index = train::to_device(h.row_index, device);
  return b;
}

void read_stats(SequenceScores& s) {
  if (!s.stats.defined()) return;
  at::Tensor v = s.stats.to(torch::kCPU);
  s.entropy_sum = v[0].item<double>();
  s.chosen_correct = v[1].item<double>();
  s.logits_chosen = v[2].item<double>();
  s.logits_rejected = v[3].item<double>();
}

SequenceScores sequence_scores(const model::Qwen2Model& m, const PairBatch& b, std::optional<double> ld_alpha,
                               bool cpo_logits, bool checkpointed, bool read) {
  const int64_t R = b.ids.size(0), T = b.ids.size(1), P = R / 2;
  model::ForwardInput in;
  in.input_ids = b.ids;
  in.attention_mask = b.attention_mask;
  in.row_spans = b.row_spans;
  model::ForwardOptions fo;
  fo.logits = false;  // the fused op projects only the completion targets
  fo.activation_checkpointing = checkpointed;
  at::Tensor h = m.forward(in, fo).hidden;  // (R, T, H)
  const int64_t H = h.size(2);
  at::Tensor flat_h = h.reshape({R * T, H});                        // (R·T, H)
  // (N) flat r·T + t; found on the host (make_pair_batch) unless the batch was made by hand.
  at::Tensor tgt = b.target_index.defined() ? b.target_index
                                            : b.completion_mask.reshape(-1).nonzero().squeeze(1).to(h.device());
  at::Tensor hs = flat_h.index_select(0, tgt - 1);                  // (N, H) the predicting positions
  at::Tensor targets = b.ids.reshape(-1).index_select(0, tgt);      // (N)
  const at::Tensor& W = m.lm_head_weight();                         // (V, H)
  model::TokenLogProbs lp = model::lm_head_logprobs(hs, W, targets);
  at::Tensor tok = torch::zeros({R * T}, lp.logprobs.options()).index_put({tgt}, lp.logprobs).view({R, T});

  SequenceScores s;
  s.logps = dpo_sequence_logps(tok, b.completion_mask, ld_alpha);  // (R)
  s.plain_logps = ld_alpha ? dpo_sequence_logps(tok, b.completion_mask) : s.logps;
  torch::NoGradGuard ng;
  s.targets = static_cast<double>(tgt.numel());
  // Targets are in row order, chosen rows first: the first chosen_targets of them are the chosen ones.
  const int64_t nc = b.chosen_targets >= 0 ? b.chosen_targets : b.completion_mask.slice(0, 0, P).sum().item<int64_t>();
  s.chosen_targets = static_cast<double>(nc);
  at::Tensor entropy = lp.entropy.detach().to(torch::kFloat64).sum();
  at::Tensor correct = lp.correct.slice(0, 0, nc).sum().to(torch::kFloat64);
  at::Tensor lc, lr;
  if (!cpo_logits) {
    at::Tensor vm = dpo_vocab_mean_logits(hs.detach(), W).to(torch::kFloat64);  // (N)
    lc = vm.slice(0, 0, nc).sum();
    lr = vm.slice(0, nc).sum();
    s.logits_chosen_count = s.chosen_targets;
    s.logits_rejected_count = s.targets - s.chosen_targets;
  } else {
    at::Tensor vm = dpo_vocab_mean_logits(flat_h.detach(), W).to(torch::kFloat64).view({R, T});
    lc = vm.slice(0, 0, P).mean();
    lr = vm.slice(0, P).mean();
    s.logits_chosen_count = s.logits_rejected_count = 1;
  }
  s.stats = torch::stack({entropy, correct, lc, lr});
  if (read) read_stats(s);
  return s;
}

at::Tensor compute_ref_logps(const model::Qwen2Model& reference, const data::PreparedSet& set, int32_t pad_id,
                             int64_t batch_size, std::optional<double> ld_alpha) {
  torch::NoGradGuard ng;
  const int64_t rows = set.num_rows();
  at::Tensor out = torch::empty({rows, 2}, torch::kFloat32);  // (rows, 2) [chosen, rejected]
  Progress progress("reference log-probs", rows, "pairs");
  for (int64_t s = 0; s < rows; s += batch_size) {
    std::vector<int64_t> ids;
    for (int64_t i = s; i < std::min(rows, s + batch_size); ++i) ids.push_back(i);
    const int64_t P = static_cast<int64_t>(ids.size());
    PairBatch b = to_device(make_pair_batch(data::make_preference_batch(set, ids), ids, pad_id),
                            reference.embed_tokens_.device());
    at::Tensor lp = sequence_scores(reference, b, ld_alpha, false, false, /*read=*/false).logps.to(torch::kCPU);  // (2P)
    out.slice(0, s, s + P).copy_(torch::stack({lp.slice(0, 0, P), lp.slice(0, P)}, 1));
    progress.update(s + P);
  }
  progress.finish();
  return out;
}

// ---------------------------------------------------------------------------------------------
// The stage

namespace {

// What identifies a reference checkpoint without reading its weights: config.json's bytes and,
// per weight/index file, name, size and modification time (a rewritten file gets a new key). A PEFT
// adapter folder (the model is its base with the adapter merged): adapter_config.json's bytes, its
// files' as above, then its base's identity (a chain of adapters, each in turn).
std::string checkpoint_identity(const std::string& dir, int depth = 0) {
  const bool adapter = checkpoint::is_adapter_folder(dir);
  if (adapter && depth >= 8) throw Error("dpo reference " + dir + ": a chain of more than 8 adapter folders");
  const std::string config = adapter ? "adapter_config.json" : "config.json";
  std::vector<std::string> names;
  for (auto& e : fs::directory_iterator(dir)) {
    std::string n = e.path().filename().string();
    if (n == config || (n.size() > 12 && n.substr(n.size() - 12) == ".safetensors") ||
        n == "model.safetensors.index.json")
      names.push_back(n);
  }
  std::sort(names.begin(), names.end());
  std::string id = (adapter ? "adapter\n" : "folder\n") + read_file(dir + "/" + config) + "\n";
  for (auto& n : names) {
    struct stat st {};
    std::string p = dir + "/" + n;
    if (::stat(p.c_str(), &st) != 0) throw Error("cannot stat " + p);
    id += n + " " + std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) + "." +
          std::to_string(st.st_mtim.tv_nsec) + "\n";
  }
  if (adapter) id += "base\n" + checkpoint_identity(checkpoint::adapter_base_dir(dir), depth + 1);
  return id;
}

// Ratio metrics of one micro-batch (FORMULAS section 2): numerators and denominators are summed
// over ranks before dividing, so the logged value is TRL's gathered mean.
std::vector<train::Ratio> pair_ratios(const PairMetricSums& m, const SequenceScores& s) {
  return {{"rewards/chosen", m.reward_chosen, m.pairs},
          {"rewards/rejected", m.reward_rejected, m.pairs},
          {"rewards/accuracies", m.correct, m.pairs},
          {"rewards/margins", m.reward_chosen - m.reward_rejected, m.pairs},
          {"logps/chosen", m.logp_chosen, m.pairs},
          {"logps/rejected", m.logp_rejected, m.pairs},
          {"logits/chosen", s.logits_chosen, s.logits_chosen_count},
          {"logits/rejected", s.logits_rejected, s.logits_rejected_count},
          {"entropy", s.entropy_sum, s.targets},
          {"mean_token_accuracy", s.chosen_correct, s.chosen_targets}};
}

}  // namespace

struct DpoStage::Impl {
  DpoRecipe& r;
  std::string run_dir, ref_dir, ref_identity;
  parallel::Comm comm;
  int rank = 0, world_size = 1;
  train::Policy p;  // the policy (p.model), its tokenizer and pad id, on run.device
  model::Qwen2Model& policy = p.model;
  int32_t& pad_id = p.pad_id;
  model::Qwen2Model reference;  // on the policy's device
  train::Splits splits;
  std::unique_ptr<data::PreparedSet>& train = splits.train;
  std::unique_ptr<data::PreparedSet>& eval = splits.eval;
  std::unique_ptr<data::Loader>& loader = splits.loader;
  at::Tensor ref_train, ref_eval;  // (rows, 2) when precomputed, on the policy's device
  bool ref_ready = false;
  std::string ref_cache;
  double flops_per_token = 0;
  eval::Heldout heldout;
  bool live_fits = true;
  bool precompute = false;  // dpo.precompute_ref_log_probs resolved
  std::string mode_reason;

  Impl(DpoRecipe& recipe, const std::string& dir, parallel::Comm group, bool live_reference_fits)
      : r(recipe), run_dir(dir), comm(std::move(group)), live_fits(live_reference_fits) {
    rank = comm.rank();
    world_size = comm.world_size();
    p = train::load_policy(r, train::run_device(r), "the SFT stage's final/ folder");
    heldout = eval::Heldout(r.dpo.heldout, p.tokenizer);
    // Every parameter, or with model.lora the adapters on a frozen base.
    train::make_trainable(p, r, run_dir, comm, "CAUSAL_LM");
    // Reference: dpo.ref_path, else the policy's starting point (with LoRA: the policy with its
    // adapters off, which is model.path's model, or model.config's random init).
    if (!r.dpo.is_cpo()) {
      ref_dir = !r.dpo.ref_path.empty() ? r.dpo.ref_path : r.model.path;
      if (rank == 0 && p.lora && r.dpo.ref_path.empty())
        log::info("dpo: the reference is the policy with its LoRA adapters off (no second copy)" +
                  std::string(r.model.adapter.empty() ? ""
                                                      : ": model.path without model.adapter; set dpo.ref_path=" +
                                                            r.model.adapter + " to compare against the adapter's model"));
      if (!ref_dir.empty()) {
        const std::string problem = checkpoint::model_folder_problem(ref_dir);
        if (!problem.empty())
          throw Error("dpo reference \"" + ref_dir + "\" (" + (r.dpo.ref_path.empty() ? "model.path" : "dpo.ref_path") +
                      ") is not a model folder: " + problem +
                      "\n---> HINT: point it at an HF folder or a PEFT adapter folder, e.g. runs/sft/final");
        ref_identity = checkpoint_identity(ref_dir);
      } else {
        ref_identity = "random-init\n" + read_file(r.model.config) + "\nseed " + std::to_string(r.run.seed) + "\n";
      }
    }
    // Data: one pair per row; the prompt keeps its end, replies their start (datasets/prepare.h).
    splits = train::open_splits(r, run_dir, data::Format::kPreference, p.tok_path, comm,
                                "preference JSONL files (prompt/chosen/rejected)");
    if (!r.dpo.is_cpo()) {
      precompute = decide_precompute(&mode_reason);
      if (rank == 0) log::info("dpo: reference log-probs " + std::string(precompute ? "precomputed" : "live") + " (" + mode_reason + ")");
      if (!precompute) load_reference();
    }
    double attn = 0;
    int64_t n_params = 0;
    // Policy forward+backward (6N; with LoRA 4N + 6N_lora), plus a live reference forward (2N) when there is one.
    flops_per_token = train::decoder_flops_per_token(policy, r.data.max_seq_len, &attn, &n_params, p.lora.get());
    if (!r.dpo.is_cpo() && !precompute) flops_per_token += 2.0 * n_params + attn / 3.0;
  }

  // dpo.precompute_ref_log_probs: true / false as set; auto by the reference forwards each way costs
  // (the pass: every train and eval pair once; live: every trained pair and the eval pairs at each
  // eval), a cache that already exists (costs nothing), and memory (a live reference that does not fit).
  bool decide_precompute(std::string* why) {
    const std::string& mode = r.dpo.precompute_ref_log_probs;
    if (mode == "true" || mode == "false") {
      *why = "dpo.precompute_ref_log_probs=" + mode;
      return mode == "true";
    }
    std::string key;
    // Every rank decides the same way (a rank going live while another precomputes would run
    // different collectives), by rank 0's cache: the pass reads or writes it there (cached_ref_logps).
    const std::string cache = cache_path(*train, "train", &key);
    double cached = rank == 0 && path_exists(cache) ? 1.0 : 0.0;
    if (world_size > 1) cached = comm.all_reduce(cached, parallel::ReduceOp::kSum);
    if (cached > 0) {
      *why = "auto: reusing the cached pass " + cache;
      return true;
    }
    if (!live_fits) {
      *why = "auto: the memory estimate leaves no room for a live reference beside the policy";
      return true;
    }
    const int64_t pairs = train->num_rows(), eval_pairs = eval ? eval->num_rows() : 0;
    const int64_t micro = r.train.micro_batch_size * r.train.grad_accum * world_size;  // pairs per step
    int64_t steps = r.train.max_steps;
    if (steps <= 0) {
      const int64_t mbpe = (pairs + r.train.micro_batch_size * world_size - 1) / (r.train.micro_batch_size * world_size);
      steps = (r.train.epochs * mbpe + r.train.grad_accum - 1) / r.train.grad_accum;
    }
    const int64_t trained = steps * micro;
    const int64_t evals = eval_pairs == 0 ? 0 : (r.train.eval_every > 0 ? steps / r.train.eval_every : 0) + 1;
    const int64_t pass = pairs + eval_pairs, live = trained + eval_pairs * evals;
    *why = "auto: " + std::to_string(steps) + " steps x " + std::to_string(micro) + " pairs = " +
           std::to_string(trained) + " trained pairs" +
           (evals ? " + " + std::to_string(evals) + " evals x " + std::to_string(eval_pairs) + " pairs" : std::string()) +
           " = " + std::to_string(live) + " live reference forwards vs " + std::to_string(pass) +
           " for the pass over data.train" + (eval_pairs ? std::string(" + data.eval") : std::string()) +
           "; dpo.precompute_ref_log_probs=true|false forces either";
    return pass <= live;
  }

  void load_reference() {
    if (reference.embed_tokens_.defined()) return;
    if (p.lora && r.dpo.ref_path.empty()) {
      reference = *train::adapters_off(p);  // shares the frozen base: nothing loaded, nothing copied
      return;
    }
    // The policy's start: ref_dir (dpo.ref_path, else model.path), or the same random init from
    // model.config and the seed when neither is set.
    config::ModelSection m = r.model;
    m.path = ref_dir;
    reference = train::load_model(m, r.run.seed, "dpo.ref_path or model.path", p.device);
    reference.set_requires_grad(false);
    if (reference.config().vocab_size != policy.config().vocab_size)
      throw Error("dpo reference " + ref_dir + " has vocab_size " + std::to_string(reference.config().vocab_size) +
                  " but the policy has " + std::to_string(policy.config().vocab_size) +
                  "\n---> HINT: the reference must share the policy's tokenizer; check dpo.ref_path");
  }

  // Where one split's reference log-probs are cached, and the key they are stored under.
  std::string cache_path(const data::PreparedSet& set, const std::string& split, std::string* key) const {
    // v2: the sums are LD-DPO mixed with dpo.ld_alpha (v1 caches were always plain sums).
    char ld[32];
    std::snprintf(ld, sizeof ld, "%.17g", r.dpo.ld_alpha);
    std::string material = "ptk-dpo-ref-logps-v2\n" + ref_identity + "data " + set.fingerprint() + "\nld_alpha " + ld + "\n";
    *key = data::sha256_hex(material.data(), material.size());
    return parent_dir(set.dir()) + "/" + split + "-ref_logps-" + key->substr(0, 16) + ".safetensors";
  }

  // The cache of one split's reference log-probs: reused when its key (reference checkpoint, data
  // fingerprint, dpo.ld_alpha, format version) matches, else computed and written (rank 0) atomically.
  at::Tensor cached_ref_logps(const data::PreparedSet& set, const std::string& split) {
    // v2: the sums are LD-DPO mixed with dpo.ld_alpha (v1 caches were always plain sums).
    std::string key;
    std::string path = cache_path(set, split, &key);
    if (split == "train") ref_cache = path;
    at::Tensor t;
    if (rank == 0) {
      t = read_cache(path, key, set.num_rows());
      if (!t.defined()) {
        load_reference();
        log::info("dpo: computing reference log-probs of " + std::to_string(set.num_rows()) + " " + split +
                  " pairs (once; cached in " + path + ")");
        t = compute_ref_logps(reference, set, pad_id, r.dpo.precompute_ref_batch_size, r.dpo.ld());
        std::string tmp = path + ".tmp-" + std::to_string(::getpid());
        try {
          checkpoint::write_safetensors(tmp, {{"ref_logps", t}},
                                        {{"format", "pt"}, {"key", key}, {"reference", ref_dir}, {"data", set.dir()}});
          fsync_path(tmp);
        } catch (...) {
          checkpoint::discard_partial_write(tmp, path);  // a full disk: its space comes back now
          throw;
        }
        if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot rename " + tmp + " to " + path);
        fsync_path(parent_dir(path));
      }
    }
    comm.barrier();
    if (rank != 0) {
      t = read_cache(path, key, set.num_rows());
      if (!t.defined()) throw Error("rank " + std::to_string(rank) + " cannot read rank 0's reference log-probs " + path +
                                    "\n---> HINT: the run folder must be on a filesystem every rank sees");
    }
    return t;
  }

  // The cached (rows, 2) tensor, or undefined when absent or written for another reference/data.
  at::Tensor read_cache(const std::string& path, const std::string& key, int64_t rows) {
    if (!path_exists(path)) return at::Tensor();
    try {
      auto m = checkpoint::MappedSafetensors::open(path);
      auto it = m->header().metadata.find("key");
      at::Tensor t = m->get("ref_logps");
      if (it != m->header().metadata.end() && it->second == key && t.dim() == 2 && t.size(0) == rows && t.size(1) == 2) {
        if (rank == 0) log::info("dpo: reusing reference log-probs " + path);
        return t.clone();
      }
      log::warn("dpo: " + path + " does not match this reference and data; recomputing it");
    } catch (const Error& e) {
      log::warn("dpo: cannot read " + path + " (" + e.what() + "); recomputing it");
    }
    return at::Tensor();
  }

  void ensure_reference() {
    if (ref_ready || r.dpo.is_cpo()) return;
    if (precompute) {
      ref_train = train::to_device(cached_ref_logps(*train, "train"), p.device);
      if (eval) ref_eval = train::to_device(cached_ref_logps(*eval, "eval"), p.device);
      reference = model::Qwen2Model();  // freed: the cache is all that is needed
    }
    ref_ready = true;
  }

  // (P, 2) reference sums of a batch of `set`'s rows.
  at::Tensor ref_for(const PairBatch& b, bool is_eval) {
    ensure_reference();
    if (precompute) {
      const at::Tensor& all = is_eval ? ref_eval : ref_train;
      return all.index_select(0, b.row_index.defined() ? b.row_index : torch::tensor(b.rows, torch::kInt64).to(all.device()));
    }
    torch::NoGradGuard ng;
    at::Tensor lp = sequence_scores(reference, b, r.dpo.ld(), false, false, /*read=*/false).logps;  // (2P), LD-mixed as the policy's
    const int64_t P = lp.size(0) / 2;
    return torch::stack({lp.slice(0, 0, P), lp.slice(0, P)}, 1);
  }

  struct Computed {
    at::Tensor loss;  // not yet divided by the step's N
    // The micro-batch's ratio metrics, read back from the device when called (after the step).
    std::function<std::vector<train::Ratio>()> ratios;
  };

  Computed compute(const PairBatch& b, bool is_eval) {
    const bool cpo = r.dpo.is_cpo();
    SequenceScores sc = sequence_scores(policy, b, cpo ? std::nullopt : r.dpo.ld(), cpo, r.model.activation_checkpointing,
                                        /*read=*/false);
    const int64_t P = static_cast<int64_t>(b.rows.size());
    at::Tensor pc = sc.logps.slice(0, 0, P), pr = sc.logps.slice(0, P);  // (P) each
    at::Tensor nc = b.completion_tokens.slice(0, 0, P), nr = b.completion_tokens.slice(0, P);
    Computed c;
    SequenceScores stats = sc;
    stats.logps = stats.plain_logps = at::Tensor();  // the closure keeps no graph
    if (cpo) {
      CpoLossOutput o = cpo_loss({pc, pr, nc, nr}, r.dpo.cpo_options());
      c.loss = o.loss;
      c.ratios = [stats, cr = o.chosen_rewards.detach(), rr = o.rejected_rewards.detach(), cs = o.chosen_scores.detach(),
                  rs = o.rejected_scores.detach(), nll = o.nll.detach()]() mutable {
        read_stats(stats);
        auto v = pair_ratios(pair_metric_sums(cr, rr, cs, rs), stats);
        v.push_back({"nll_loss", nll.item<double>(), 1.0});
        return v;
      };
    } else {
      at::Tensor ref = ref_for(b, is_eval);  // (P, 2)
      DpoLossOutput o = dpo_loss({pc, pr, ref.select(1, 0), ref.select(1, 1), nc, nr, sc.plain_logps.slice(0, 0, P)},
                                 r.dpo.dpo_options());
      c.loss = o.loss;
      c.ratios = [stats, cr = o.chosen_rewards.detach(), rr = o.rejected_rewards.detach(), pcd = pc.detach(),
                  prd = pr.detach()]() mutable {
        read_stats(stats);
        return pair_ratios(pair_metric_sums(cr, rr, pcd, prd), stats);
      };
    }
    return c;
  }
};

DpoStage::DpoStage(DpoRecipe& recipe, const std::string& run_dir, parallel::Comm comm, bool live_reference_fits)
    : impl_(std::make_unique<Impl>(recipe, run_dir, std::move(comm), live_reference_fits)) {}
DpoStage::~DpoStage() = default;

void DpoStage::set_rank(int rank, int world_size) {
  PTK_CHECK(rank == impl_->rank && world_size == impl_->world_size,
            "DpoStage::set_rank: the stage was built for rank " + std::to_string(impl_->rank) + " of " +
                std::to_string(impl_->world_size) + "; pass the Trainer's comm to the DpoStage constructor");
  data::LoaderOptions lo = impl_->loader->options();
  lo.rank = rank;
  lo.world_size = world_size;
  impl_->loader = std::make_unique<data::Loader>(*impl_->train, lo);
  impl_->ensure_reference();  // rank 0 computes a missing cache while the others wait
}

optim::NamedTensors DpoStage::parameters() { return train::trainable_parameters(impl_->p); }
int64_t DpoStage::micro_batches_per_epoch() const { return impl_->loader->batches_per_epoch(); }

PairBatch DpoStage::next_batch(int64_t* targets, int64_t* tokens) {
  impl_->ensure_reference();
  auto rows = impl_->loader->next_rows();
  PairBatch b = make_pair_batch(data::make_preference_batch(*impl_->train, rows), rows, impl_->pad_id);
  // One target per micro-batch: the loop's N is then K·ranks (see the header).
  *targets = 1;
  *tokens = b.tokens;
  return to_device(b, impl_->p.device);
}

std::string DpoStage::cursor_json() const { return impl_->loader->cursor_json(); }
void DpoStage::restore_cursor(const std::string& j) { impl_->loader->restore_cursor(j); }

train::LossOut DpoStage::batch_loss(const PairBatch& b, double step_targets) {
  Impl::Computed c = impl_->compute(b, false);
  train::LossOut out;
  out.loss = c.loss / step_targets;
  out.read_back = [ratios = std::move(c.ratios)](train::LossOut& o) { o.ratios = ratios(); };
  return out;
}

void DpoStage::evaluate(Metrics* out) {
  torch::NoGradGuard ng;
  evaluate_pairs(out);
  impl_->heldout.run(impl_->policy, out, &impl_->comm);  // dpo.eval_prompts: accuracy, completions/mean_length
}

void DpoStage::evaluate_pairs(Metrics* out) {
  if (!impl_->eval) return;
  const data::PreparedSet& set = *impl_->eval;
  const int64_t rows = set.num_rows(), bs = impl_->r.dpo.eval_micro_batch_size;
  // TRL's eval metrics: each batch's values, then their plain mean over batches.
  std::vector<std::string> names{"loss"};
  std::vector<double> sum{0}, count{0};
  for (int64_t s = 0; s < rows; s += bs) {
    std::vector<int64_t> ids;
    for (int64_t i = s; i < std::min(rows, s + bs); ++i) ids.push_back(i);
    PairBatch b = to_device(make_pair_batch(data::make_preference_batch(set, ids), ids, impl_->pad_id), impl_->p.device);
    Impl::Computed c = impl_->compute(b, true);
    sum[0] += c.loss.item<double>();
    count[0] += 1;
    for (auto& ratio : c.ratios()) {
      size_t i = std::find(names.begin(), names.end(), ratio.name) - names.begin();
      if (i == names.size()) {
        names.push_back(ratio.name);
        sum.push_back(0);
        count.push_back(0);
      }
      if (ratio.den > 0) {
        sum[i] += ratio.num / ratio.den;
        count[i] += 1;
      }
    }
  }
  for (size_t i = 0; i < names.size(); ++i) out->add(names[i], count[i] ? sum[i] / count[i] : std::nan(""));
}

void DpoStage::save_model(const std::string& dir) { train::save_policy_model(impl_->policy, impl_->p, impl_->r, dir); }
void DpoStage::after_final(const std::string& run_dir) { train::save_merged_final(impl_->p, impl_->r, run_dir); }
double DpoStage::frozen_bytes() const { return train::frozen_bytes(impl_->p); }

double DpoStage::flops_per_token() const { return impl_->flops_per_token; }
const model::Qwen2Model& DpoStage::policy() const { return impl_->policy; }
const model::Qwen2Model& DpoStage::reference() const { return impl_->reference; }
at::Tensor DpoStage::ref_logps(const PairBatch& b) { return impl_->ref_for(b, false); }
const std::string& DpoStage::ref_cache_path() const { return impl_->ref_cache; }
bool DpoStage::precomputes_reference() const { return impl_->precompute; }
const std::string& DpoStage::reference_mode_reason() const { return impl_->mode_reason; }
const data::PreparedSet& DpoStage::train_set() const { return *impl_->train; }
int32_t DpoStage::pad_id() const { return impl_->pad_id; }

std::string run_dpo(DpoRecipe& r, const std::string& recipe_file, const std::string& resolved) {
  std::string run_dir = train::run_dir_of(r, recipe_file);  // made by trainer_options, after the rerun check
  torch::manual_seed(static_cast<uint64_t>(r.run.seed));
  train::TrainerOptions options = train::trainer_options(r, run_dir, resolved, "dpo");
  bool live_fits = true;
  if (auto plan = train::memory_plan_from_recipe(r, train::StageKind::kDpo)) {
    const bool reference = !r.dpo.is_cpo();
    // With LoRA the reference is the policy with its adapters off (unless dpo.ref_path loads one): no second copy.
    const bool reference_copy = reference && !(r.lora.enabled && r.dpo.ref_path.empty());
    const std::string& mode = r.dpo.precompute_ref_log_probs;
    plan->eval_micro_batch_size = !data::has_eval_data(r.data) ? 0 : r.dpo.eval_micro_batch_size;
    plan->heldout_new_tokens = r.dpo.heldout.prompts.empty() ? 0 : r.dpo.heldout.max_new_tokens;
    if (reference_copy && mode == "auto" && r.train.memory_check) {
      // auto goes live only where a second model fits beside the policy (every rank agrees).
      train::MemoryPlan live = *plan;
      live.live_reference = true;
      double refused = train::memory_refusal(live, train::available_memory(live.cuda)).empty() ? 0.0 : 1.0;
      if (options.comm.world_size() > 1) refused = options.comm.all_reduce(refused, parallel::ReduceOp::kSum);
      live_fits = refused == 0;
    }
    plan->live_reference = reference_copy && (mode == "false" || (mode == "auto" && live_fits));
    plan->reference_pass_pairs = reference && mode != "false" ? r.dpo.precompute_ref_batch_size : 0;
    train::check_memory_estimate(r, *plan, options.comm);  // before the models, data or batches exist
  }
  DpoStage stage(r, run_dir, options.comm, live_fits);
  train::Trainer trainer(stage, options);
  std::string what = r.dpo.is_cpo() ? "cpo (" + r.dpo.loss_type[0] + ", no reference)"
                                    : std::string("dpo against ") + (stage.precomputes_reference() ? "precomputed" : "live") +
                                          " reference log-probs";
  log::info(what + ": " + std::to_string(trainer.total_steps()) + " optimizer steps of " +
            std::to_string(r.train.micro_batch_size * r.train.grad_accum) + " pairs; run folder " + run_dir);
  {
    torch::NoGradGuard ng;
    stage.heldout_at_start(train::is_fresh_run(r, run_dir));
  }
  trainer.run();
  return run_dir;
}

void DpoStage::heldout_at_start(bool fresh) {
  impl_->heldout.run_at_start(impl_->policy, &impl_->comm, fresh, impl_->run_dir, "dpo");
}

}  // namespace ptk::rl
