// `ptk forward --model DIR --input F.json --output G.safetensors`: runs a Qwen2 folder on given
// token ids and writes logits [B,T,V] float32 (and scores [B] for a score head). A reference and
// debugging tool (compare with transformers); not batched serving (see `ptk generate`).
#include <torch/torch.h>

#include <iostream>

#include "apps/ptk/cli.h"
#include "core/checkpoint/checkpoint.h"
#include "core/model/qwen2.h"
#include "core/runtime/device.h"
#include "core/runtime/runtime.h"
#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::app {
namespace {

// A (B, T) list of lists of integers from field `key` of the input file; undefined when absent.
at::Tensor read_matrix(const rapidjson::Document& doc, const char* key, const std::string& path, bool required) {
  auto it = doc.FindMember(key);
  if (it == doc.MemberEnd()) {
    if (required) throw Error(path + ": no \"" + key + "\" (a list of lists of token ids)");
    return {};
  }
  const auto& v = it->value;
  if (!v.IsArray() || v.Empty()) throw Error(path + ": \"" + key + "\" must be a non-empty list of lists");
  std::vector<int64_t> flat;
  size_t cols = 0;
  for (rapidjson::SizeType r = 0; r < v.Size(); ++r) {
    if (!v[r].IsArray()) throw Error(path + ": " + key + "[" + std::to_string(r) + "] is not a list");
    if (r == 0) cols = v[r].Size();
    if (v[r].Size() != cols || cols == 0)
      throw Error(path + ": " + key + "[" + std::to_string(r) + "] has " + std::to_string(v[r].Size()) +
                  " entries but row 0 has " + std::to_string(cols) + "; pad every row to the same length");
    for (rapidjson::SizeType c = 0; c < v[r].Size(); ++c) {
      if (!v[r][c].IsInt64())
        throw Error(path + ": " + key + "[" + std::to_string(r) + "][" + std::to_string(c) + "] is not an integer");
      flat.push_back(v[r][c].GetInt64());
    }
  }
  return torch::tensor(flat, torch::kLong).view({static_cast<int64_t>(v.Size()), static_cast<int64_t>(cols)});
}

}  // namespace

int cmd_forward(int argc, char** argv) {
  namespace po = boost::program_options;
  cli::CommandLine cl("forward", "ptk forward --model DIR --input F.json --output G.safetensors",
                      "Runs a Qwen2 / Qwen2.5 Hugging Face folder on token ids and writes its outputs.\n"
                      "F.json holds input_ids and attention_mask (lists of lists, left or right padding) and\n"
                      "optionally position_ids; without them positions are cumsum(attention_mask) - 1.\n"
                      "G.safetensors gets logits [B,T,V] float32 (when the model has an LM head) and, for a\n"
                      "Qwen2ForSequenceClassification folder, scores [B] read at the last non-pad token (a real\n"
                      "token equal to config.json's pad_token_id is passed over, as transformers does).");
  cl.flags().add_options()("model", po::value<std::string>()->required(), "Hugging Face model folder")(
      "input", po::value<std::string>()->required(), "JSON file with input_ids, attention_mask[, position_ids]")(
      "output", po::value<std::string>()->required(), "safetensors file to write")(
      "dtype", po::value<std::string>()->default_value("float32"),
      "compute dtype: float32 (exact reference) or bfloat16 (faster on GPU, ~1e-2 off)")(
      "device", po::value<std::string>()->default_value("auto"),
      "where the model runs: auto (a GPU when there is one, else the CPU) | cpu | cuda | cuda:N");
  if (!cl.parse(argc, argv)) return 0;
  runtime::init_and_announce(cl.threads());
  const auto input = cl.get<std::string>("input"), output = cl.get<std::string>("output");
  const auto dtype_name = cl.get<std::string>("dtype");
  if (dtype_name != "float32" && dtype_name != "bfloat16")
    throw UsageError("ptk forward: --dtype must be float32 or bfloat16, not " + dtype_name);
  const at::Device device = runtime::resolve_device(cl.get<std::string>("device"), "--device");

  auto doc = json::parse_file(input);
  if (!doc.IsObject()) throw Error(input + ": must be a JSON object with input_ids and attention_mask");
  auto ids = read_matrix(doc, "input_ids", input, true);
  auto mask = read_matrix(doc, "attention_mask", input, false);
  auto positions = read_matrix(doc, "position_ids", input, false);
  if (!mask.defined()) mask = torch::ones_like(ids);
  for (auto* t : {&mask, &positions})
    if (t->defined() && t->sizes() != ids.sizes())
      throw Error(input + ": attention_mask / position_ids must have the shape of input_ids [" +
                  std::to_string(ids.size(0)) + ", " + std::to_string(ids.size(1)) + "]");

  torch::NoGradGuard no_grad;
  model::LoadOptions lo;
  lo.dtype = dtype_name == "bfloat16" ? at::kBFloat16 : at::kFloat;
  lo.device = device;
  auto m = model::Qwen2Model::from_pretrained(cl.get<std::string>("model"), lo);
  // A score-head folder has an LM head only through tied embeddings.
  const bool lm_head = !m.has_score_head() || m.config().tie_word_embeddings;
  model::ForwardOptions fo;
  fo.logits = lm_head;
  auto out = m.forward({ids, positions, mask, {}, {}}, fo);
  checkpoint::NamedTensors result;
  if (lm_head) result.emplace_back("logits", out.logits.to(at::kCPU, at::kFloat));
  if (m.has_score_head())
    result.emplace_back("scores",
                        m.score(out.hidden, model::score_index(ids, mask, m.config().pad_token_id)).to(at::kCPU, at::kFloat));
  checkpoint::write_safetensors(output, result);
  std::cerr << "ptk forward: wrote";
  for (const auto& [n, t] : result) std::cerr << " " << n << " " << t.sizes();
  std::cerr << " to " << output << "\n";
  return 0;
}

}  // namespace ptk::app
