#include "core/train/memory_estimate.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "core/kernels/cpu/cpu_features.h"
#include "core/runtime/device_memory.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/strings.h"

namespace ptk::train {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kGiB = 1024.0 * kMiB;
constexpr double kRuntimeBytes = 0.5 * kGiB;   // ptk + LibTorch + MKL resident at start-up: 483 MiB (BENCHMARKS.md)
constexpr double kChunkBytes = 256.0 * kMiB;   // model::LogProbOptions::chunk_bytes
constexpr double kKeepLogitsBytes = kGiB;      // model::LogProbOptions::keep_logits_bytes
constexpr double kPackMaxBytes = 2.0 * kGiB;   // rollout::EngineOptions::pack_max_bytes
constexpr double kHeldoutSlots = 64;           // eval::EvalOptions::slots

// The model's widths as doubles (products of recipe values overflow int64 for absurd recipes).
struct Shape {
  double V, H, I, L, heads, Q, KV;
};

// config.json's head_dim (parse_config sets it), else hidden_size / heads for a hand-built config.
int64_t head_dim_of(const checkpoint::Qwen2Config& c) {
  return c.head_dim > 0 ? c.head_dim : c.hidden_size / std::max<int64_t>(1, c.num_attention_heads);
}

Shape shape_of(const checkpoint::Qwen2Config& c) {
  const double d = static_cast<double>(head_dim_of(c));
  return {static_cast<double>(c.vocab_size), static_cast<double>(c.hidden_size),
          static_cast<double>(c.intermediate_size), static_cast<double>(c.num_hidden_layers),
          static_cast<double>(c.num_attention_heads), c.num_attention_heads * d, c.num_key_value_heads * d};
}

// Parameters of a decoder layer's linears (what the decode packing copies), without biases.
double layer_linear_params(const Shape& s) { return s.H * s.Q + 2 * s.H * s.KV + s.Q * s.H + 3 * s.H * s.I; }

double parameter_count(const checkpoint::Qwen2Config& c, StageKind stage) {
  const Shape s = shape_of(c);
  const double layer = layer_linear_params(s) + s.Q + 2 * s.KV + 2 * s.H;  // + q/k/v biases, two norms
  double n = s.V * s.H + s.L * layer + s.H;                                // + embedding, final norm
  // The RM stage swaps the lm_head for a (1, H) score head (Qwen2ForSequenceClassification).
  if (stage == StageKind::kRm || c.has_score_head()) n += s.H * std::max<int64_t>(1, c.num_labels);
  else if (!c.tie_word_embeddings) n += s.V * s.H;
  return n;
}

double act_bytes(const MemoryPlan& p) { return p.bf16 ? 2.0 : 4.0; }

// What autograd keeps of one training forward over `rows` rows of T tokens (module comment).
double activation_bytes(const MemoryPlan& p, const Shape& s, double rows, double T) {
  const double b = act_bytes(p), N = rows * T;
  const double per_layer_token = b * (6 * s.H + 3 * s.Q + 2 * s.KV + 4 * s.I);
  // Attention probabilities kept for backward, per layer: none with ptk's flash kernel or CUDA's
  // fused SDPA (one log-sum-exp per query row); the causal half with the fp32 block path; the full
  // square (float32 softmax and its dtype copy) for other dtypes.
  double attention = 0;
  if (p.cuda || (p.flash_attention && !p.bf16)) attention = 0;
  else if (!p.bf16) attention = rows * s.heads * T * T / 2 * 4;
  else attention = rows * s.heads * T * T * (4 + b);
  const double layer = N * per_layer_token + attention;
  const double layers = p.activation_checkpointing ? s.L * N * s.H * b + layer : s.L * layer;
  return layers + N * 2 * s.H * b;  // + the final norm
}

// The fused lm_head + log-softmax op over `scored` rows (module comment); fp32 logits. The (V, H)
// fp32 weight gradient only when the weight trains (a frozen LoRA base's gets none).
double lm_head_bytes(const Shape& s, double scored, bool weight_grad) {
  const double logits = scored * s.V * 4;
  return std::min(logits, kKeepLogitsBytes) + std::min(logits, 2 * kChunkBytes) + (weight_grad ? s.V * s.H * 4 : 0);
}

// Whether the output layer's weight trains: always without LoRA; with it, when it is a module to save
// (lm_head, or embed_tokens on an untied model: the tied case is refused).
bool lm_head_trains(const MemoryPlan& p) {
  if (!p.lora) return true;
  for (const auto& m : p.lora_modules_to_save)
    if (m == "lm_head" || m == "embed_tokens") return true;
  return false;
}

// A forward without grad over `rows` x T: its largest layer transient plus one lm_head chunk.
double no_grad_forward_bytes(const MemoryPlan& p, const Shape& s, double rows, double T, bool lm_head) {
  const double b = act_bytes(p), N = rows * T;
  double attention = 0;  // the block path holds one block of 128 query rows; other dtypes the square
  if (!p.cuda && !(p.flash_attention && !p.bf16))
    attention = p.bf16 ? rows * s.heads * T * T * (8 + b) : rows * s.heads * std::min(T, 128.0) * T * 4;
  return N * b * (3 * s.H + 3 * s.I) + attention + (lm_head ? std::min(N * s.V * 4, kChunkBytes) : 0);
}

std::string num(double v) {
  std::ostringstream o;
  o.precision(v >= 1e15 ? 3 : 15);
  o << v;
  return o.str();
}
std::string kv(const std::string& key, double v) { return key + "=" + num(v); }
std::string b2s(bool v) { return v ? "true" : "false"; }

struct Phase {
  std::string name;
  std::vector<MemoryTerm> terms;
  double bytes() const {
    double t = 0;
    for (auto& x : terms) t += x.bytes;
    return t;
  }
};

std::string eval_key(const MemoryPlan& p, const char* leaf) { return std::string(stage_name(p.stage)) + "." + leaf; }

}  // namespace

double lora_parameter_count(const checkpoint::Qwen2Config& c, int64_t rank, const std::vector<std::string>& targets,
                            const std::vector<std::string>& modules_to_save, StageKind stage) {
  const Shape s = shape_of(c);
  const double r = static_cast<double>(rank);
  // (in + out) of each linear PEFT can adapt in a Qwen2 decoder layer.
  const std::vector<std::pair<std::string, double>> linears = {
      {"q_proj", s.H + s.Q},     {"k_proj", s.H + s.KV}, {"v_proj", s.H + s.KV}, {"o_proj", s.Q + s.H},
      {"gate_proj", s.H + s.I},  {"up_proj", s.H + s.I}, {"down_proj", s.I + s.H}};
  const bool all = std::find(targets.begin(), targets.end(), "all-linear") != targets.end();
  double per_layer = 0;
  for (const auto& [name, in_out] : linears)
    if (all || std::find(targets.begin(), targets.end(), name) != targets.end()) per_layer += r * in_out;
  double n = s.L * per_layer;
  bool score = stage == StageKind::kRm;
  for (const auto& m : modules_to_save) {
    if (m == "score") score = true;
    else if (m == "embed_tokens" || m == "lm_head") n += s.V * s.H;
  }
  if (score) n += s.H * std::max<int64_t>(1, c.num_labels);
  return n;
}

const char* stage_name(StageKind s) {
  switch (s) {
    case StageKind::kSft: return "sft";
    case StageKind::kDpo: return "dpo";
    case StageKind::kRm: return "rm";
    case StageKind::kGrpo: return "grpo";
  }
  return "?";
}

MemoryEstimate estimate_memory(const MemoryPlan& p) {
  const Shape s = shape_of(p.model);
  const double b = act_bytes(p), P = parameter_count(p.model, p.stage);
  const double mb = static_cast<double>(p.micro_batch_size), T = static_cast<double>(p.max_seq_len);
  const std::string dtype = p.bf16 ? "bfloat16" : "float32";
  MemoryEstimate e;
  e.parameters = P;

  // Resident through the run.
  auto millions = [](double n) {
    char count[32];
    std::snprintf(count, sizeof count, n >= 1e7 ? "%.0fM" : "%.2fM", n / 1e6);  // 494M, 0.39M
    return std::string(count);
  };
  const std::string params = millions(P) + " parameters, " + dtype;
  // The trained parameters' gradients and AdamW state (moments, and fp32 masters with bf16).
  auto optimizer_state = [&](double n, const std::string& keys, const std::string& note) {
    const bool sharded = (p.zero1 || p.zero2) && p.world_size > 1;
    const std::string ranks = " over " + std::to_string(p.world_size) + " ranks";
    if (p.zero2 && p.world_size > 1)  // each rank keeps its shard of the summed gradient
      e.resident.push_back({p.lora ? "LoRA gradients" : "gradients", "train.sharding=zero2" + ranks,
                            n * b / static_cast<double>(p.world_size), note});
    else
      e.resident.push_back({p.lora ? "LoRA gradients" : "gradients", keys, n * b, note});
    double adam = n * (8 + (p.bf16 ? 4 : 0));
    std::string adam_keys = std::string("train.sharding=") + (p.zero2 ? "zero2" : p.zero1 ? "zero1" : "none");
    if (sharded) {
      adam /= static_cast<double>(p.world_size);
      adam_keys += ranks;
    }
    e.resident.push_back({std::string(p.lora ? "LoRA " : "") +
                              (p.bf16 ? "AdamW moments + fp32 master weights" : "AdamW moments"),
                          adam_keys, adam});
  };
  if (p.lora) {
    const double Pl = lora_parameter_count(p.model, p.lora_rank, p.lora_targets, p.lora_modules_to_save, p.stage);
    e.trainable_parameters = Pl;
    std::string lkeys = "model.lora.rank=" + std::to_string(p.lora_rank) + " on " + join(p.lora_targets, ",");
    if (!p.lora_modules_to_save.empty()) lkeys += " + modules_to_save " + join(p.lora_modules_to_save, ",");
    const std::string lnote = millions(Pl) + " parameters, " + dtype;
    e.resident.push_back({"frozen base weights", p.model_key, P * b, params + ", no gradients or optimizer state"});
    e.resident.push_back({"LoRA weights", lkeys, Pl * b, lnote});
    optimizer_state(Pl, lkeys, lnote);
  } else {
    e.trainable_parameters = P;
    e.resident.push_back({"weights", p.model_key, P * b, params});
    optimizer_state(P, p.model_key, params);
  }
  // A second model beside the policy. The stages set live_reference only for a real copy: under LoRA
  // the reference is the base with the adapters off, unless dpo.ref_path loads another model.
  // grpo.reference_device=host on a GPU: in host memory between passes (a phase below, not resident).
  const bool ref_uploaded = p.live_reference && p.reference_on_host && p.cuda;
  if (p.live_reference && !ref_uploaded)
    e.resident.push_back({"frozen reference model",
                          p.stage == StageKind::kGrpo ? "grpo.beta != 0"
                          : p.lora                    ? "dpo.ref_path with model.lora.enabled"
                                                      : "dpo.precompute_ref_log_probs=false or auto",
                          P * b});
  // GRPO under LoRA keeps the base's AVX-512 decode copies between generations (the base never
  // changes; rollout::EngineOptions::keep_packed) unless the output layer trains.
  const bool packs_kept = p.lora && p.stage == StageKind::kGrpo && p.decode_packing && !p.bf16 && !p.cuda && !lm_head_trains(p);
  if (packs_kept) {
    const double trunk = s.L * layer_linear_params(s) * 4;
    e.resident.push_back({"decode copies of the weights", "model.lora.enabled", s.V * s.H * 4 + (trunk <= kPackMaxBytes ? trunk : 0),
                          "AVX-512 packed layout of the frozen base, kept between generations"});
  }
  if (!p.cuda) e.resident.push_back({"LibTorch, MKL and ptk", "", kRuntimeBytes});

  // Phases: the run peaks in the largest.
  std::vector<Phase> phases;
  const std::string ckpt = "model.activation_checkpointing=" + b2s(p.activation_checkpointing);
  {
    Phase ph{"training step", {}};
    double rows = mb, len = T, scored = mb * T;
    std::string keys = kv("train.micro_batch_size", mb) + " x " + kv("data.max_seq_len", T);
    switch (p.stage) {
      case StageKind::kSft:
        break;
      case StageKind::kDpo:
      case StageKind::kRm:
        rows = 2 * mb;  // chosen and rejected rows in one batch
        scored = rows * T;
        keys = kv("train.micro_batch_size", mb) + " pairs (" + num(rows) + " rows) x " + kv("data.max_seq_len", T);
        break;
      case StageKind::kGrpo:
        len = T + static_cast<double>(p.completion_len);
        scored = mb * static_cast<double>(p.completion_len);
        keys = kv("train.micro_batch_size", mb) + " x (" + kv("data.max_seq_len", T) + " + " +
               kv("grpo.max_completion_length", static_cast<double>(p.completion_len)) + ")";
        break;
    }
    ph.terms.push_back({"activations", keys, activation_bytes(p, s, rows, len), ckpt});
    if (p.stage == StageKind::kRm)
      ph.terms.push_back({"score head", keys, rows * len * s.H * b});
    else
      ph.terms.push_back({"lm_head log-probs (fused op)", keys, lm_head_bytes(s, scored, lm_head_trains(p))});
    phases.push_back(std::move(ph));
  }
  if (p.eval_micro_batch_size > 0) {
    const double rows = static_cast<double>(p.eval_micro_batch_size) * (p.stage == StageKind::kSft ? 1 : 2);
    phases.push_back({"eval on data.eval",
                      {{"forward without gradients",
                        kv(eval_key(p, "eval_micro_batch_size"), static_cast<double>(p.eval_micro_batch_size)) +
                            " x " + kv("data.max_seq_len", T),
                        no_grad_forward_bytes(p, s, rows, T, p.stage != StageKind::kRm)}}});
  }
  if (p.reference_pass_pairs > 0) {
    // The reference sits where the gradients go later (before the first backward): only its
    // forward adds.
    const double pairs = static_cast<double>(p.reference_pass_pairs);
    phases.push_back({"reference log-prob pass",
                      {{"reference forward without gradients",
                        kv("dpo.precompute_ref_batch_size", pairs) + " pairs x " + kv("data.max_seq_len", T),
                        no_grad_forward_bytes(p, s, 2 * pairs, T, true)}}});
  }
  if (ref_uploaded) {
    // The copy uploaded for the pass, with every slice's forward (one micro-batch at a time): the KV
    // cache is freed before it and the update's activations come after it.
    const double len = T + static_cast<double>(p.completion_len);
    phases.push_back({"reference log-prob pass",
                      {{"frozen reference model (uploaded from host memory)", "grpo.reference_device=host", P * b},
                       {"reference forward without gradients",
                        kv("train.micro_batch_size", mb) + " x (" + kv("data.max_seq_len", T) + " + " +
                            kv("grpo.max_completion_length", static_cast<double>(p.completion_len)) + ")",
                        no_grad_forward_bytes(p, s, mb, len, true)}}});
  }
  auto generation = [&](const std::string& name, double slots, double len, const std::string& keys) {
    Phase ph{name, {}};
    ph.terms.push_back({"KV cache", keys, slots * len * s.L * 2 * s.KV * b});
    if (p.decode_packing && !p.bf16 && !p.cuda && !packs_kept) {
      const double trunk = s.L * layer_linear_params(s) * 4;
      ph.terms.push_back({"decode copies of the weights", "", s.V * s.H * 4 + (trunk <= kPackMaxBytes ? trunk : 0),
                          "AVX-512 packed layout, freed after each generation"});
    }
    ph.terms.push_back({"logits of a decode step", keys, slots * s.V * 4 * 2});
    phases.push_back(std::move(ph));
  };
  if (p.stage == StageKind::kGrpo) {
    const double len = T + static_cast<double>(p.completion_len);
    generation("generation", static_cast<double>(p.slots), len,
               kv("rollout.slots", static_cast<double>(p.slots)) + " x (" + kv("data.max_seq_len", T) + " + " +
                   kv("grpo.max_completion_length", static_cast<double>(p.completion_len)) + ")");
  } else if (p.heldout_new_tokens > 0) {
    // Held-out prompts are read by the stage; their length is not known here.
    generation("held-out generation", kHeldoutSlots, static_cast<double>(p.heldout_new_tokens),
               kv(eval_key(p, "eval_max_new_tokens"), static_cast<double>(p.heldout_new_tokens)) + " x " +
                   num(kHeldoutSlots) + " slots");
  }
  const Phase* top = &phases.front();
  for (const auto& ph : phases)
    if (ph.bytes() > top->bytes()) top = &ph;
  e.phase = top->name;
  e.peak = top->terms;
  for (auto& t : e.resident) e.total_bytes += t.bytes;
  e.total_bytes += top->bytes();
  return e;
}

// ---- the machine ----

double meminfo_available_bytes(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    char* end = nullptr;
    const double kb = std::strtod(line.c_str() + 13, &end);
    if (end == line.c_str() + 13) return -1;
    return kb * 1024;
  }
  return -1;
}

double cgroup_limit_bytes(const std::string& text) {
  std::string v = text;
  while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) v.pop_back();
  if (v.empty() || v == "max") return -1;
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (!end || *end != '\0' || x <= 0) return -1;
  if (x >= 0x7ffffffffffff000 * 0.999) return -1;  // cgroup v1's "unlimited" (PAGE_COUNTER_MAX pages)
  return x;
}

double memory_stat_bytes(const std::string& text, const std::string& field) {
  std::istringstream in(text);
  std::string name;
  double value;
  while (in >> name >> value)
    if (name == field) return value;
  return -1;
}

namespace {

// A /proc or /sys file, "" when it is absent or unreadable (a machine without that cgroup file).
std::string slurp(const std::string& path) {
  try {
    return read_file(path);
  } catch (const Error&) {
    return "";
  }
}

// The cgroup paths of this process: v2 ("0::/a/b") and v1's memory controller ("4:memory:/a/b").
void own_cgroups(std::string* v2, std::string* v1) {
  std::istringstream in(slurp("/proc/self/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    std::string ctrl = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && ctrl.empty()) *v2 = path;
    std::istringstream cs(ctrl);
    for (std::string c; std::getline(cs, c, ',');)
      if (c == "memory") *v1 = path;
  }
}

// The tightest room (limit minus non-cache usage) of `path` and its ancestors under `mount`;
// sets `label` to the limiting file. -1 when none has a limit.
double cgroup_room(const std::string& mount, std::string path, bool v2, std::string* label) {
  double best = -1;
  for (;;) {
    const std::string dir = mount + (path == "/" ? "" : path);
    const double limit = cgroup_limit_bytes(slurp(dir + (v2 ? "/memory.max" : "/memory.limit_in_bytes")));
    if (limit > 0) {
      std::string usage_s = slurp(dir + (v2 ? "/memory.current" : "/memory.usage_in_bytes"));
      const double usage = usage_s.empty() ? 0 : std::strtod(usage_s.c_str(), nullptr);
      const std::string stat = slurp(dir + "/memory.stat");
      double cache = memory_stat_bytes(stat, v2 ? "file" : "total_cache");
      if (cache < 0 && !v2) cache = memory_stat_bytes(stat, "cache");
      const double room = limit - std::max(0.0, usage - std::max(0.0, cache));
      if (best < 0 || room < best) {
        best = room;
        *label = std::string(v2 ? "cgroup v2 memory.max " : "cgroup v1 memory.limit_in_bytes ") + format_bytes(limit) +
                 " less " + format_bytes(std::max(0.0, usage - std::max(0.0, cache))) + " in use";
      }
    }
    if (path.empty() || path == "/") break;
    auto slash = path.rfind('/');
    path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
  }
  return best;
}

}  // namespace

AvailableMemory available_memory(bool cuda, int device) {
  AvailableMemory a;
  if (cuda) {
    size_t free_bytes = 0, total = 0;
    if (runtime::cuda_free_memory(device, &free_bytes, &total)) {
      a.bytes = static_cast<double>(free_bytes);
      a.source = "CUDA device " + std::to_string(device) + " free (of " + format_bytes(static_cast<double>(total)) + ")";
    }
    return a;
  }
#ifdef __linux__
  a.bytes = meminfo_available_bytes(slurp("/proc/meminfo"));
  a.source = "MemAvailable";
  std::string v2, v1, label;
  own_cgroups(&v2, &v1);
  double room = -1;
  if (!v2.empty() && path_exists("/sys/fs/cgroup/cgroup.controllers")) {
    room = cgroup_room("/sys/fs/cgroup", v2, true, &label);
    if (room < 0 && v2 != "/") room = cgroup_room("/sys/fs/cgroup", "/", true, &label);  // a cgroup namespace
  }
  if (room < 0 && !v1.empty() && path_exists("/sys/fs/cgroup/memory/memory.limit_in_bytes")) {
    room = cgroup_room("/sys/fs/cgroup/memory", v1, false, &label);
    if (room < 0 && v1 != "/") room = cgroup_room("/sys/fs/cgroup/memory", "/", false, &label);
  }
  if (room >= 0 && (a.bytes < 0 || room < a.bytes)) {
    a.bytes = room;
    a.source = label;
  }
  if (a.bytes >= 0) {
    long local = 1;
    if (const char* env = std::getenv("LOCAL_WORLD_SIZE")) local = std::max(1L, std::strtol(env, nullptr, 10));
    if (local > 1) {
      a.bytes /= static_cast<double>(local);
      a.source += ", split among " + std::to_string(local) + " ranks on this machine (LOCAL_WORLD_SIZE)";
    }
  }
#endif
  return a;
}

// ---- the refusal ----

namespace {

// An integer recipe key the estimate grows with, and the plan field it sets.
struct Knob {
  std::string key;
  int64_t MemoryPlan::*field;
  int64_t floor;  // its smallest valid value
};

std::vector<Knob> knobs_of(const MemoryPlan& p) {
  std::vector<Knob> k{{"train.micro_batch_size", &MemoryPlan::micro_batch_size, 1},
                      {"data.max_seq_len", &MemoryPlan::max_seq_len, 2}};
  if (p.stage == StageKind::kGrpo) {
    k.push_back({"grpo.max_completion_length", &MemoryPlan::completion_len, 1});
    k.push_back({"rollout.slots", &MemoryPlan::slots, 1});
  }
  if (p.eval_micro_batch_size > 0) k.push_back({eval_key(p, "eval_micro_batch_size"), &MemoryPlan::eval_micro_batch_size, 1});
  if (p.reference_pass_pairs > 0)
    k.push_back({"dpo.precompute_ref_batch_size", &MemoryPlan::reference_pass_pairs, 1});
  if (p.heldout_new_tokens > 0 && p.stage != StageKind::kGrpo)
    k.push_back({eval_key(p, "eval_max_new_tokens"), &MemoryPlan::heldout_new_tokens, 1});
  return k;
}

// The largest value of `k` in [floor, current) with which the plan fits `avail`; -1 if none.
int64_t largest_fitting(MemoryPlan p, const Knob& k, double avail) {
  int64_t lo = k.floor, hi = p.*(k.field) - 1;
  p.*(k.field) = lo;
  if (hi < lo || estimate_memory(p).total_bytes > avail) return -1;
  while (lo < hi) {  // invariant: lo fits
    const int64_t mid = lo + (hi - lo + 1) / 2;
    p.*(k.field) = mid;
    if (estimate_memory(p).total_bytes <= avail) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

std::string model_shape(const checkpoint::Qwen2Config& c) {
  return "hidden " + std::to_string(c.hidden_size) + ", " + std::to_string(c.num_hidden_layers) + " layers, vocab " +
         std::to_string(c.vocab_size);
}

}  // namespace

std::string memory_refusal(const MemoryPlan& p, const AvailableMemory& avail) {
  if (avail.bytes < 0) return "";
  const MemoryEstimate e = estimate_memory(p);
  if (e.total_bytes <= avail.bytes) return "";
  // The largest term names the keys responsible.
  const MemoryTerm* big = nullptr;
  for (const auto* list : {&e.resident, &e.peak})
    for (const auto& t : *list)
      if (!big || t.bytes > big->bytes) big = &t;
  auto paren = [](const MemoryTerm& t) {
    std::string in = t.keys;
    if (!t.note.empty()) in += (in.empty() ? "" : "; ") + t.note;
    return in.empty() ? in : " (" + in + ")";
  };
  std::string msg = std::string(stage_name(p.stage)) + ": ";
  if (!big->keys.empty()) {
    msg += big->keys + " needs ~" + format_bytes(big->bytes) + " for " + big->what +
           (big->note.empty() ? "" : " (" + big->note + ")");
  } else {
    msg += big->what + " need ~" + format_bytes(big->bytes);
  }
  msg += " with this model (" + model_shape(p.model) + "); the run needs ~" + format_bytes(e.total_bytes) +
         " at its peak (" + e.phase + ") and this " + (p.cuda ? "GPU" : "machine") + " has " +
         format_bytes(avail.bytes) + " available (" + avail.source + ").";
  if (!(p.stage == StageKind::kSft && p.packing))
    msg += " Rows are padded to the longest record of their micro-batch; the estimate takes data.max_seq_len"
           " (the longest allowed).";
  msg += "\nEstimate per rank (README, \"Memory estimate\"):";
  for (const auto& t : e.resident) msg += "\n  - " + t.what + ": " + format_bytes(t.bytes) + paren(t);
  for (const auto& t : e.peak) msg += "\n  - " + e.phase + ", " + t.what + ": " + format_bytes(t.bytes) + paren(t);

  // Ways out: one key lowered; else the keys lowered in order (each to its floor until the next
  // one can fit); activation checkpointing, alone or with that.
  const auto knobs = knobs_of(p);
  auto fits = [&](const MemoryPlan& q) { return estimate_memory(q).total_bytes <= avail.bytes; };
  auto combined = [&](MemoryPlan q) -> std::string {
    std::string out;
    for (const auto& k : knobs) {
      const int64_t v = largest_fitting(q, k, avail.bytes);
      if (v >= 0) return out + (out.empty() ? "" : " and ") + k.key + " to " + std::to_string(v) + " or less";
      if (q.*(k.field) > k.floor) {
        q.*(k.field) = k.floor;
        out += (out.empty() ? "" : ", ") + k.key + " to " + std::to_string(k.floor);
        if (fits(q)) return out;
      }
    }
    return "";
  };
  std::vector<std::string> fixes;
  for (const auto& k : knobs) {
    const int64_t v = largest_fitting(p, k, avail.bytes);
    if (v >= 0) fixes.push_back("lower " + k.key + " to " + std::to_string(v) + " or less");
  }
  if (fixes.empty()) {
    const std::string c = combined(p);
    if (!c.empty()) fixes.push_back("lower " + c);
  }
  if (!p.activation_checkpointing) {
    MemoryPlan q = p;
    q.activation_checkpointing = true;
    if (fits(q)) {
      fixes.push_back("set model.activation_checkpointing=true (~" + format_bytes(estimate_memory(q).total_bytes) +
                      ")");
    } else if (fixes.empty()) {
      const std::string c = combined(q);
      if (!c.empty()) fixes.push_back("set model.activation_checkpointing=true and lower " + c);
    }
  }
  msg += "\n---> HINT: ";
  if (!fixes.empty()) {
    for (size_t i = 0; i < fixes.size(); ++i) msg += (i ? i + 1 == fixes.size() ? "; or " : "; " : "") + fixes[i];
    msg += ".";
  } else {
    double state = 0;
    for (const auto& t : e.resident) state += t.bytes;
    msg += "no batch or length key makes this fit: what stays resident (weights, gradients, AdamW state" +
           std::string(p.live_reference && !p.lora ? ", the reference" : "") + ") needs ~" + format_bytes(state) +
           " of the " + format_bytes(avail.bytes) + "; ";
    if (p.lora)
      msg += "with LoRA the frozen base (" + format_bytes(e.parameters * act_bytes(p)) +
             ") is whole on every rank (train.zero1 shards only the adapters' optimizer state, and ptk has no QLoRA "
             "4-bit base): use a smaller model" + (p.bf16 ? "" : " or model.dtype=bfloat16") + ".";
    else
      msg += "use a smaller model, model.dtype=bfloat16, model.lora.enabled=true (LoRA: no gradients or AdamW state "
             "for the base), or train.sharding=zero2 (or zero1) over more ranks.";
  }
  msg += " train.memory_check=false skips this check (the estimate is deliberately a little high).";
  return msg;
}

std::optional<MemoryPlan> memory_plan_from_recipe(const config::TrainingRecipe& r, StageKind stage) {
  MemoryPlan p;
  p.stage = stage;
  std::string source;
  // An adapter folder's config.json is its base's (read_config follows base_model_name_or_path).
  if (!r.model.path.empty() && (path_exists(r.model.path + "/config.json") || path_exists(r.model.path + "/adapter_config.json"))) {
    source = r.model.path;
    p.model_key = "model.path=" + r.model.path;
  } else if (r.model.path.empty() && !r.model.config.empty() && path_exists(r.model.config)) {
    source = r.model.config;
    p.model_key = "model.config=" + r.model.config;
  }
  if (source.empty()) return std::nullopt;
  p.model = checkpoint::read_config(source);
  p.micro_batch_size = r.train.micro_batch_size;
  p.max_seq_len = r.data.max_seq_len;
  p.packing = r.data.packing;
  p.activation_checkpointing = r.model.activation_checkpointing;
  // The conditions under which core/kernels/dispatch.h picks the flash kernel on the CPU (else the
  // block path keeps probabilities): kernels.attention auto or cpu_flash (PTK_ATTENTION_FLASH=0 and
  // PTK_ATTENTION_BLOCK_ROWS=0 are its aliases for cpu_block and ref); the decode packing needs AVX-512 as well.
  const char* flash_env = std::getenv("PTK_ATTENTION_FLASH");
  const char* block_env = std::getenv("PTK_ATTENTION_BLOCK_ROWS");
  const std::string& kernel = r.kernels.attention;
  const bool env_off = (flash_env && std::string(flash_env) == "0") || (block_env && std::atoll(block_env) <= 0);
  p.flash_attention = kernels::cpu::cpu_has_avx512f() && head_dim_of(p.model) % 16 == 0 &&
                      (kernel == "cpu_flash" || (kernel == "auto" && !env_off));
  p.decode_packing = kernels::cpu::cpu_has_avx512f();
  if (const char* ws = std::getenv("WORLD_SIZE")) p.world_size = std::max(1L, std::strtol(ws, nullptr, 10));
  p.zero1 = r.train.sharding_mode() == "zero1";
  p.zero2 = r.train.sharding_mode() == "zero2";
  p.lora = r.lora.enabled;
  p.lora_rank = r.lora.rank;
  p.lora_targets = r.lora.targets;
  p.lora_modules_to_save = r.lora.modules_to_save;
  // On a GPU (run.device, auto included) the plan is compared with that device's memory.
  const int cuda_index = runtime::cuda_index_of(r.run.device);
  p.cuda = cuda_index >= 0;
  p.bf16 = r.model.bf16_params(p.cuda);  // as the stages load it (from_recipe.h model_load_options)
  p.device = p.cuda ? cuda_index : 0;
  return p;
}

}  // namespace ptk::train
