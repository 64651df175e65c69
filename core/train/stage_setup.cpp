#include "core/train/stage_setup.h"

#include <c10/core/TensorOptions.h>

#include "core/runtime/device.h"
#include "core/util/error.h"
#include "core/util/fs.h"

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

double decoder_flops_per_token(const model::Qwen2Model& m, int64_t seq_len, double* attn, int64_t* decoder_params) {
  int64_t n_params = 0;
  for (auto& [n, t] : m.named_parameters())
    if (n.find("embed_tokens") == std::string::npos && n.find("lm_head") == std::string::npos) n_params += t.numel();
  const auto& c = m.config();
  const double a = 6.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * static_cast<double>(seq_len) / 2.0;
  if (attn) *attn = a;
  if (decoder_params) *decoder_params = n_params;
  return 6.0 * n_params + a;
}

void save_policy_model(const model::Qwen2Model& model, const Policy& p, const config::TrainingRecipe& r,
                       const std::string& dir) {
  checkpoint::SaveOptions so;
  so.source_dir = p.tok_dir;
  so.chat_template = p.chat_template;
  so.max_shard_bytes = r.checkpoint.max_shard_bytes();
  model.save_pretrained(dir, so);
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
