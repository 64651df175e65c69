#include "core/train/stage_setup.h"

#include <c10/core/TensorOptions.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "core/runtime/device.h"
#include "core/runtime/log.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/strings.h"

namespace ptk::train {

// meta is allowed here: tests build stages on it; the commands refuse it earlier (trainer_options).
at::Device run_device(const config::TrainingRecipe& r) {
  return runtime::resolve_device(r.run.device, "run.device", /*allow_meta=*/true);
}

Policy load_policy(const config::TrainingRecipe& r, const at::Device& device, const std::string& path_hint) {
  Policy p;
  p.device = device;
  p.tok_path = !r.tokenizer.path.empty() ? r.tokenizer.path : r.model.path;
  if (p.tok_path.empty())
    throw Error("no tokenizer: set tokenizer.path (a folder with tokenizer.json, or the file) or model.path");
  p.tok_dir = path_exists(p.tok_path + "/tokenizer.json") ? p.tok_path : parent_dir(p.tok_path);
  p.tokenizer = std::make_shared<const tokenizer::Tokenizer>(tokenizer::Tokenizer::load(
      p.tok_path, tokenizer::chat_load_options(r.tokenizer.chat_template, r.tokenizer.chat_template_kwargs)));
  const auto& tok = *p.tokenizer;
  if (tok.chat_template_overridden()) p.chat_template = tok.chat_template_source();
  p.pad_id = tok.pad_id() >= 0 ? tok.pad_id() : tok.eos_id();
  p.model = load_model(r.model, r.run.seed, path_hint, device);
  if (static_cast<int64_t>(tok.vocab_size()) > p.model.config().vocab_size)
    throw Error("the tokenizer at " + p.tok_path + " has " + std::to_string(tok.vocab_size()) +
                " ids but the model's vocab_size is " + std::to_string(p.model.config().vocab_size) +
                "\n---> HINT: the model and tokenizer do not belong together; check model.path / tokenizer.path");
  return p;
}

namespace {

// How a policy's folders are saved: its tokenizer files and chat template, the recipe's shard size.
checkpoint::SaveOptions policy_save_options(const Policy& p, const config::TrainingRecipe& r) {
  checkpoint::SaveOptions so;
  so.source_dir = p.tok_dir;
  so.chat_template = p.chat_template;
  so.max_shard_bytes = r.checkpoint.max_shard_bytes();
  return so;
}

// model.lora as the model's options for a stage training `task_type`.
model::LoraOptions lora_options(const config::LoraSection& L, const std::string& task_type) {
  model::LoraOptions o;
  o.rank = L.rank;
  o.alpha = L.alpha;
  o.dropout = L.dropout;
  o.targets = L.targets;
  o.rslora = L.rslora;
  o.init = L.init;
  o.modules_to_save = L.modules_to_save;
  o.task_type = task_type;
  // PEFT trains and saves a sequence classifier's head with the adapter (modules_to_save).
  if (task_type == "SEQ_CLS" && std::find(o.modules_to_save.begin(), o.modules_to_save.end(), "score") == o.modules_to_save.end())
    o.modules_to_save.push_back("score");
  return o;
}

// Refuses model.adapter (loaded as `c`, its adapters on `m`) unless it is what `o` would train.
void check_adapter_matches(const std::string& dir, const checkpoint::AdapterConfig& c, const model::Qwen2Model& m,
                           const model::LoraOptions& o) {
  if (c.task_type != o.task_type)
    throw Error("model.adapter=" + dir + " is a " + c.task_type + " adapter; this stage trains a " +
                (o.task_type == "SEQ_CLS" ? "reward model (SEQ_CLS, with its score head)" : "causal LM (CAUSAL_LM)") +
                "\n---> HINT: start from an adapter of the same kind, or use model.path=" + dir +
                " to start from the model it makes (merged)");
  std::string diff;
  if (c.lora_dropout != o.dropout) diff += " dropout " + std::to_string(c.lora_dropout) + " (recipe " + std::to_string(o.dropout) + ")";
  std::vector<std::string> saved = o.modules_to_save, have_saved = c.modules_to_save;
  std::sort(saved.begin(), saved.end());
  std::sort(have_saved.begin(), have_saved.end());
  if (saved != have_saved) diff += " modules_to_save [" + join(have_saved, ", ") + "]";
  if (c.r != o.rank) diff += " rank " + std::to_string(c.r) + " (recipe " + std::to_string(o.rank) + ")";
  if (c.lora_alpha != o.alpha) diff += " alpha " + std::to_string(c.lora_alpha) + " (recipe " + std::to_string(o.alpha) + ")";
  if (c.use_rslora != o.rslora) diff += std::string(" rslora ") + (c.use_rslora ? "true" : "false");
  std::vector<std::string> have;  // the linears the adapter adapts in layer 0
  for (size_t k = 0; k < model::kLayerLinears; ++k)
    if (m.adapter(0, static_cast<model::LinearId>(k))) have.push_back(model::lora_linear_names()[k]);
  if (have != model::lora_target_names(o.targets)) diff += " targets [" + join(have, ", ") + "] in layer 0";
  if (!diff.empty())
    throw Error("model.adapter=" + dir + " differs from model.lora:" + diff +
                "\n---> HINT: set model.lora.rank / alpha / dropout / targets / rslora / modules_to_save to the adapter's "
                "(its adapter_config.json)");
}

}  // namespace

void make_trainable(Policy& p, const config::TrainingRecipe& r, const std::string& run_dir, parallel::Comm& comm,
                    const std::string& task_type) {
  const auto& L = r.lora;
  if (!L.enabled) {
    if (!r.model.adapter.empty())
      throw Error("model.adapter=" + r.model.adapter + " is set but model.lora.enabled is false\n---> HINT: set "
                  "model.lora.enabled=true to go on training that adapter, or model.path=" + r.model.adapter +
                  " to train the whole model with it merged");
    p.model.set_requires_grad(true);
    return;
  }
  p.model.set_requires_grad(false);  // the base: frozen
  std::string base;
  if (!r.model.path.empty()) {
    base = std::filesystem::absolute(r.model.path).lexically_normal().string();
    while (base.size() > 1 && base.back() == '/') base.pop_back();
  } else {
    // A random-init base exists nowhere else: the adapter needs a folder to go onto.
    base = std::filesystem::absolute(run_dir + "/base").lexically_normal().string();
    // (The meta device of the tests has no values to write.)
    if (comm.rank() == 0 && !p.device.is_meta() && !path_exists(base + "/config.json"))
      p.model.save_pretrained(base, policy_save_options(p, r));
    comm.barrier();
  }
  const model::LoraOptions o = lora_options(L, task_type);
  if (!r.model.adapter.empty()) {
    p.lora = std::make_shared<model::Lora>(model::Lora::load(p.model, r.model.adapter));
    check_adapter_matches(r.model.adapter, p.lora->config(), p.model, o);
  } else {
    // Its own stream: the adapters' initial values do not depend on anything drawn before.
    p.lora = std::make_shared<model::Lora>(model::Lora::attach(p.model, o, static_cast<uint64_t>(r.run.seed) + 0x10A4));
  }
  p.lora->set_base_model(base);
  for (auto& [name, t] : p.lora->named_parameters()) t.set_requires_grad(true);
  if (comm.rank() == 0) {
    int64_t total = 0;
    for (const auto& [name, t] : p.model.named_parameters()) total += t.numel();
    const auto& c = p.lora->config();
    const std::string targets = join(c.target_modules, ",");
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "LoRA: rank %lld, alpha %g (scaling %.4g), dropout %g on %s%s: %lld trainable parameters "
                  "(%.3f%% of %lld); the base is frozen in %s; adapter base %s",
                  static_cast<long long>(c.r), c.lora_alpha, c.scaling(), c.lora_dropout, targets.c_str(),
                  c.modules_to_save.empty() ? "" : (" + " + std::to_string(c.modules_to_save.size()) + " saved module(s)").c_str(),
                  static_cast<long long>(p.lora->numel()), 100.0 * static_cast<double>(p.lora->numel()) / static_cast<double>(total),
                  static_cast<long long>(total), checkpoint::torch_dtype_name(p.model.embed_tokens_.scalar_type()).c_str(), base.c_str());
    log::info(buf);
  }
}

optim::NamedTensors trainable_parameters(const Policy& p) {
  return p.lora ? p.lora->named_parameters() : p.model.named_parameters();
}

double frozen_bytes(const Policy& p) {
  if (!p.lora) return 0;
  double bytes = 0;
  for (const auto& [name, t] : p.model.named_parameters())
    if (!t.requires_grad()) bytes += static_cast<double>(t.numel()) * t.element_size();
  return bytes;
}

std::optional<model::Qwen2Model> adapters_off(const Policy& p) {
  if (!p.lora) return std::nullopt;
  return p.lora->base_of(p.model);
}

Splits open_splits(const config::TrainingRecipe& r, const std::string& run_dir, data::Format format,
                   const std::string& tok_path, parallel::Comm& comm, const std::string& what,
                   const std::function<void(data::PrepareOptions&)>& adjust) {
  if (r.data.train.empty()) throw Error("data.train is empty: name the " + what);
  const bool has_eval = data::has_eval_data(r.data);
  auto popt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, format);
  popt.tokenizer_path = tok_path;
  if (adjust) adjust(popt);
  const std::string train_dir = data::prepared_dir(run_dir, "train"), eval_dir = data::prepared_dir(run_dir, "eval");
  data::PrepareOptions eopt;
  if (has_eval) {
    eopt = data::prepare_options_from_recipe(r.data, r.tokenizer, r.model, r.run.seed, format, true);
    eopt.tokenizer_path = tok_path;
    if (adjust) adjust(eopt);
  }
  if (comm.rank() == 0) {
    data::ensure_prepared(popt, train_dir);
    if (has_eval) data::ensure_prepared(eopt, eval_dir);
  }
  comm.barrier();
  Splits s;
  s.train = std::make_unique<data::PreparedSet>(data::PreparedSet::open(train_dir));
  data::LoaderOptions lo;
  lo.micro_batch_size = r.train.micro_batch_size;
  lo.seed = static_cast<uint64_t>(r.run.seed);
  s.loader = std::make_unique<data::Loader>(*s.train, lo);
  if (has_eval) s.eval = std::make_unique<data::PreparedSet>(data::PreparedSet::open(eval_dir));
  return s;
}

void set_loader_rank(Splits& s, int rank, int world_size) {
  data::LoaderOptions lo = s.loader->options();
  lo.rank = rank;
  lo.world_size = world_size;
  s.loader = std::make_unique<data::Loader>(*s.train, lo);
}

double decoder_flops_per_token(const model::Qwen2Model& m, int64_t seq_len, double* attn, int64_t* decoder_params,
                               const model::Lora* lora) {
  int64_t n_params = 0;
  for (auto& [n, t] : m.named_parameters())
    if (n.find("embed_tokens") == std::string::npos && n.find("lm_head") == std::string::npos) n_params += t.numel();
  const auto& c = m.config();
  const double a = 6.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * static_cast<double>(seq_len) / 2.0;
  if (attn) *attn = a;
  if (decoder_params) *decoder_params = n_params;
  if (lora) {
    double adapters = 0;  // A and B only: a module to save (score, embeddings, lm_head) is outside N too
    for (const auto& [name, t] : lora->named_parameters())
      if (name.find(".lora_") != std::string::npos) adapters += static_cast<double>(t.numel());
    return 4.0 * n_params + 6.0 * adapters + a;
  }
  return 6.0 * n_params + a;
}

void save_policy_model(const model::Qwen2Model& model, const Policy& p, const config::TrainingRecipe& r,
                       const std::string& dir) {
  const checkpoint::SaveOptions so = policy_save_options(p, r);
  if (p.lora) p.lora->save(dir, so);
  else model.save_pretrained(dir, so);
}

void save_merged_final(const Policy& p, const config::TrainingRecipe& r, const std::string& run_dir) {
  if (!p.lora || !r.lora.save_merged) return;
  // Merged on the CPU: a second copy of every adapted weight may not fit beside the run on a GPU.
  p.lora->merged(p.model, at::kCPU).save_pretrained(run_dir + "/final-merged", policy_save_options(p, r));
}

at::Tensor to_device(const at::Tensor& host, const at::Device& device) {
  if (!host.defined() || host.device() == device) return host;
  if (device.is_cuda() && host.is_cpu()) return host.pin_memory().to(device, /*non_blocking=*/true);
  return host.to(device);
}

std::vector<std::pair<int64_t, int64_t>> right_padded_spans(const std::vector<int64_t>& lengths) {
  std::vector<std::pair<int64_t, int64_t>> out;
  out.reserve(lengths.size());
  for (int64_t n : lengths) out.emplace_back(0, n);
  return out;
}

}  // namespace ptk::train
