// LoRA adapters on Qwen2Model, in PEFT's files. See lora.h.
#include "core/model/lora.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "core/util/error.h"

namespace ptk::model {
namespace {

constexpr const char* kPeftPrefix = "base_model.model.";

at::Tensor& weight_of(Qwen2Layer& l, LinearId id) {
  switch (id) {
    case LinearId::kQ: return l.q_proj_w;
    case LinearId::kK: return l.k_proj_w;
    case LinearId::kV: return l.v_proj_w;
    case LinearId::kO: return l.o_proj_w;
    case LinearId::kGate: return l.gate_proj_w;
    case LinearId::kUp: return l.up_proj_w;
    case LinearId::kDown: return l.down_proj_w;
  }
  throw std::logic_error("weight_of: bad LinearId");
}

// PEFT's module path of a modules_to_save entry, and the model field it is.
std::string saved_module_path(const std::string& m) { return m == "embed_tokens" ? "model.embed_tokens" : m; }
at::Tensor& saved_field(Qwen2Model& model, const std::string& m) {
  if (m == "score") return model.score_;
  if (m == "embed_tokens") return model.embed_tokens_;
  return model.lm_head_;
}

std::string tensor_name(int64_t layer, LinearId id, const char* ab) {
  return std::string(kPeftPrefix) + lora_module_name(layer, id) + ".lora_" + ab + ".weight";
}

// Refuses a modules_to_save entry this model cannot have.
void check_saved_module(const Qwen2Model& model, const std::string& m, const std::string& origin) {
  if (m == "score" && !model.has_score_head())
    throw Error(origin + ": modules_to_save holds \"score\" but the model has no score head (a causal LM)");
  if (m == "lm_head" && (model.has_score_head() || model.config().tie_word_embeddings))
    throw Error(origin + ": modules_to_save holds \"lm_head\" but the model has " +
                (model.has_score_head() ? "a score head instead" : "tied embeddings (its output layer is embed_tokens)"));
  if (m == "embed_tokens" && model.config().tie_word_embeddings && !model.has_score_head())
    throw Error(origin + ": modules_to_save holds \"embed_tokens\" but the model ties its embeddings to its output "
                "layer; PEFT would train a copy that the output layer does not use\n---> HINT: leave it out (LoRA on "
                "the linears), or train the whole model (no model.lora)");
  if (m != "score" && m != "lm_head" && m != "embed_tokens")
    throw Error(origin + ": modules_to_save holds \"" + m + "\"; ptk saves score, embed_tokens and lm_head");
}

}  // namespace

// ---- one adapted linear ---------------------------------------------------------------------------

LoraLinear::LoraLinear(at::Tensor a, at::Tensor b, double scaling, double dropout)
    : a_(std::move(a)), b_(std::move(b)), scaling_(scaling), dropout_(dropout) {}

at::Tensor LoraLinear::forward(const at::Tensor& x, const at::Tensor& base_out) const {
  const at::Tensor h = dropout_ > 0 && adapters_training() ? at::dropout(x, dropout_, /*train=*/true) : x;
  const at::Tensor t = at::linear(h, a_);  // (..., r)
  const int64_t out = base_out.size(-1);
  // base + s · t B^T as one GEMM with accumulation.
  return at::addmm(base_out.reshape({-1, out}), t.reshape({-1, t.size(-1)}), b_.t(), /*beta=*/1, /*alpha=*/scaling_)
      .view(base_out.sizes());
}

std::shared_ptr<const LinearAdapter> LoraLinear::with_parameters(const std::vector<at::Tensor>& p) const {
  PTK_CHECK(p.size() == 2, "LoraLinear::with_parameters: expected A and B");
  return std::make_shared<LoraLinear>(p[0], p[1], scaling_, dropout_);
}

at::Tensor LoraLinear::delta() const {
  at::NoGradGuard ng;
  return at::mm(b_.detach().to(at::kFloat), a_.detach().to(at::kFloat)).mul_(scaling_);
}

// ---- names ---------------------------------------------------------------------------------------------

const std::vector<std::string>& lora_linear_names() {
  static const std::vector<std::string> names{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return names;
}

std::vector<std::string> lora_target_names(const std::vector<std::string>& targets) {
  std::set<std::string> wanted;
  for (const auto& t : targets) {
    if (t == "all-linear") {
      wanted.insert(lora_linear_names().begin(), lora_linear_names().end());
    } else if (std::find(lora_linear_names().begin(), lora_linear_names().end(), t) != lora_linear_names().end()) {
      wanted.insert(t);
    } else {
      throw Error("model.lora.targets holds \"" + t + "\"; Qwen2's linears are q_proj, k_proj, v_proj, o_proj, "
                  "gate_proj, up_proj, down_proj (or all-linear for all seven)");
    }
  }
  if (wanted.empty()) throw Error("model.lora.targets is empty: name the linears to adapt (or all-linear)");
  std::vector<std::string> out;
  for (const auto& n : lora_linear_names())
    if (wanted.count(n)) out.push_back(n);
  return out;
}

std::string lora_module_name(int64_t layer, LinearId id) {
  return "model.layers." + std::to_string(layer) + "." + linear_name(id);
}

// ---- attach, load ------------------------------------------------------------------------------------

Lora Lora::attach(Qwen2Model& model, const LoraOptions& o, uint64_t seed) {
  if (model.has_adapters()) throw Error("model.lora: the model already has adapters");
  if (o.rank < 1) throw Error("model.lora.rank must be >= 1, got " + std::to_string(o.rank));
  if (o.init != "default" && o.init != "gaussian")
    throw Error("model.lora.init must be default or gaussian, got \"" + o.init + "\"");
  Lora L;
  auto& c = L.config_;
  c.task_type = o.task_type;
  c.r = o.rank;
  c.lora_alpha = o.alpha;
  c.lora_dropout = o.dropout;
  c.use_rslora = o.rslora;
  c.init_lora_weights = o.init == "default" ? "true" : "gaussian";
  c.target_modules = lora_target_names(o.targets);  // the short names, as PEFT matches them

  for (const auto& m : o.modules_to_save) check_saved_module(model, m, "model.lora");
  const at::Tensor& ref = model.embed_tokens_;
  auto gen = at::detail::createCPUGenerator(seed);
  at::NoGradGuard ng;
  for (int64_t i = 0; i < static_cast<int64_t>(model.layers_.size()); ++i) {
    for (size_t k = 0; k < kLayerLinears; ++k) {
      const auto id = static_cast<LinearId>(k);
      if (!c.targets(lora_module_name(i, id))) continue;
      const at::Tensor& w = weight_of(model.layers_[static_cast<size_t>(i)], id);
      const int64_t out = w.size(0), in = w.size(1);
      at::Tensor a = at::empty({o.rank, in}, at::kFloat);
      if (o.init == "default") {
        // nn.init.kaiming_uniform_(a=sqrt(5)) on (r, in): bound = gain·sqrt(3/in), gain = sqrt(2/(1+5)).
        const double bound = 1.0 / std::sqrt(static_cast<double>(in));
        a.uniform_(-bound, bound, gen);
      } else {
        a.normal_(0.0, 1.0 / static_cast<double>(o.rank), gen);
      }
      a = a.to(ref.device(), ref.scalar_type());
      at::Tensor b = at::zeros({out, o.rank}, ref.options());
      auto adapter = std::make_shared<const LoraLinear>(a, b, c.scaling(), o.dropout);
      model.set_adapter(i, id, adapter);
      L.entries_.push_back({i, id, adapter});
    }
  }
  for (const auto& m : o.modules_to_save) {
    at::Tensor& field = saved_field(model, m);
    L.originals_[m] = field;
    field = field.detach().clone();
    L.saved_.emplace_back(std::string(kPeftPrefix) + saved_module_path(m) + ".weight", field);
    c.modules_to_save.push_back(m);
  }
  return L;
}

Lora Lora::load(Qwen2Model& model, const std::string& dir, std::optional<at::ScalarType> adapter_dtype) {
  if (model.has_adapters()) throw Error(dir + ": the model already has adapters");
  Lora L;
  L.config_ = checkpoint::read_adapter_config(dir);
  const auto& c = L.config_;
  const std::string file = dir + "/" + checkpoint::kAdapterWeightsFile;
  auto tensors = checkpoint::read_checkpoint_tensors(dir);
  std::set<std::string> used;
  const at::Tensor& ref = model.embed_tokens_;
  auto take = [&](const std::string& name, const std::vector<int64_t>& shape, bool adapter) {
    auto it = tensors.find(name);
    if (it == tensors.end())
      throw Error(file + ": no tensor " + name + ", which adapter_config.json's target_modules / modules_to_save require");
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw Error(file + ": tensor " + name + " has shape " + c10::str(it->second.sizes()) + ", the model needs " +
                  c10::str(at::IntArrayRef(shape)));
    if (!at::isFloatingType(it->second.scalar_type()))
      throw Error(file + ": tensor " + name + " has non-floating dtype " + c10::toString(it->second.scalar_type()));
    used.insert(name);
    // Own storage (the file is mapped): the optimizer may update it in place.
    const at::ScalarType dtype = adapter && adapter_dtype ? *adapter_dtype : ref.scalar_type();
    return it->second.to(ref.device(), dtype, /*non_blocking=*/false, /*copy=*/true);
  };
  for (int64_t i = 0; i < static_cast<int64_t>(model.layers_.size()); ++i) {
    for (size_t k = 0; k < kLayerLinears; ++k) {
      const auto id = static_cast<LinearId>(k);
      if (!c.targets(lora_module_name(i, id))) continue;
      const at::Tensor& w = weight_of(model.layers_[static_cast<size_t>(i)], id);
      at::Tensor a = take(tensor_name(i, id, "A"), {c.r, w.size(1)}, true);
      at::Tensor b = take(tensor_name(i, id, "B"), {w.size(0), c.r}, true);
      auto adapter = std::make_shared<const LoraLinear>(a, b, c.scaling(), c.lora_dropout);
      model.set_adapter(i, id, adapter);
      L.entries_.push_back({i, id, adapter});
    }
  }
  if (L.entries_.empty())
    throw Error(dir + "/adapter_config.json: target_modules matches none of the model's linears");
  for (const auto& m : c.modules_to_save) {
    const std::string name = std::string(kPeftPrefix) + saved_module_path(m) + ".weight";
    if (!tensors.count(name) && m != "score") continue;  // PEFT lists modules the model may lack
    if (m == "score" && !model.has_score_head()) {
      if (c.task_type != "SEQ_CLS") throw Error(file + ": holds a score head but task_type is " + c.task_type);
      // A reward model's adapter on its causal-LM base: the score head comes from the adapter; pooling
      // stops at the pad token, which the base's config or the adapter's tokenizer names.
      std::optional<int64_t> pad = model.config().pad_token_id;
      if (!pad) pad = checkpoint::folder_pad_token_id(dir);
      if (!pad)
        throw Error(dir + ": a SEQ_CLS adapter on a base without pad_token_id, and no tokenizer files beside the "
                    "adapter to read the pad token from\n---> HINT: set pad_token_id in the base's config.json");
      model.add_score_head(0, *pad);
    }
    check_saved_module(model, m, dir + "/adapter_config.json");
    at::Tensor& field = saved_field(model, m);
    at::Tensor t = take(name, std::vector<int64_t>(field.sizes().begin(), field.sizes().end()), false);
    L.originals_[m] = field;
    field = t;
    L.saved_.emplace_back(name, field);
  }
  for (const auto& [name, t] : tensors)
    if (!used.count(name))
      throw Error(file + ": unexpected tensor " + name + " (not a LoRA A/B of a targeted Qwen2 linear, nor a "
                  "module to save)\n---> HINT: the adapter was made for another model or with options ptk lacks "
                  "(embedding LoRA, DoRA)");
  return L;
}

// ---- what the trainer and the files see --------------------------------------------------------

checkpoint::NamedTensors Lora::named_parameters() const {
  checkpoint::NamedTensors out;
  for (const auto& e : entries_) {
    out.emplace_back(tensor_name(e.layer, e.id, "A"), e.adapter->a());
    out.emplace_back(tensor_name(e.layer, e.id, "B"), e.adapter->b());
  }
  out.insert(out.end(), saved_.begin(), saved_.end());
  return out;
}

int64_t Lora::numel() const {
  int64_t n = 0;
  for (const auto& [name, t] : named_parameters()) n += t.numel();
  return n;
}

void Lora::save(const std::string& dir, const checkpoint::SaveOptions& options) const {
  checkpoint::save_adapter_folder(dir, config_, named_parameters(), options);
}

Qwen2Model Lora::base_of(const Qwen2Model& model) const {
  Qwen2Model m = model;
  m.clear_adapters();
  for (const auto& [module, t] : originals_) saved_field(m, module) = t;
  return m;
}

void Lora::merge_into(Qwen2Model& m, std::optional<at::Device> where) const {
  at::NoGradGuard ng;
  m.clear_adapters();
  for (const auto& e : entries_) {
    at::Tensor& w = weight_of(m.layers_[static_cast<size_t>(e.layer)], e.id);
    const at::Device dev = where.value_or(w.device());
    w = (w.detach().to(dev, at::kFloat) + e.adapter->delta().to(dev)).to(w.scalar_type());
  }
}

Qwen2Model Lora::merged(const Qwen2Model& model, std::optional<at::Device> where) const {
  Qwen2Model m = model;
  merge_into(m, where);
  return m;  // the merged weights are new tensors without grad; the rest are model's own
}

Qwen2Model load_merged_adapter(const std::string& dir, const LoadOptions& options) {
  Qwen2Model m = Qwen2Model::from_pretrained(checkpoint::adapter_base_dir(dir), options);
  Lora::load(m, dir, at::kFloat).merge_into(m);  // fp32 adapters, as PEFT's merge
  return m;
}

}  // namespace ptk::model
