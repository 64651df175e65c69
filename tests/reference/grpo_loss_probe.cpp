// grpo_loss_probe: ptk's GRPO loss functions (rl/grpo_loss.h) on inputs a Python test wrote, for
// tests/reference/grpo_reference_test.py (which feeds the same inputs through TRL's GRPOTrainer).
//
//   grpo_loss_probe CASE.json
//
// CASE.json: {"in": "in.safetensors", "out": "out.safetensors", "metrics_out": "out.json",
//             "advantage": {"num_generations": G, "reward_weights": [...], "scale_rewards": "group"},
//             "loss": {"loss_type": ..., "importance_sampling_level": ..., "beta": ..., "epsilon": ...,
//                      "epsilon_high": ... (optional), "delta": ... (optional),
//                      "use_bias_correction_kl": bool (optional), "top_entropy_quantile": ...,
//                      "max_completion_length": ..., "sapo_temperature_pos": ..., "sapo_temperature_neg": ...},
//             "micro_batches": [[begin, end], ...]}          (row ranges of one generation batch, in order)
// in.safetensors: rewards_per_func (n, K) float64 (NaN = the function returned None), logps (n, T),
//   entropy (n, T), mask (n, T); optional old_logps (n, T) (absent = μ = 1: ℓ^old is the detached ℓ),
//   ref_logps (n, T) (beta > 0).
// out.safetensors: advantages (n) and rewards (n) float64, loss (M) float64 (one per micro-batch, as
//   returned: already scaled), logps_grad (n, T) (d Σ loss / d logps, summed over the micro-batches).
// out.json: {"advantage_metrics": {...}, "micro_batches": [{metric: value, ...}, ...]} (NaN as null).
//
// The loss is scaled as rl/grpo_stage.cpp scales it on one process: the generation batch is one
// optimizer step of K = len(micro_batches) micro-batches; dapo and cispo divide by N = Σ mask over the
// whole generation batch, the others by K.
//
// Model mode: with "model": HF folder, "temperature": t and "rows": [[prompt ids], [completion ids]]
// (one per row) in CASE.json, ℓ and H come from the model instead of in.safetensors' logps/entropy,
// computed as rl/grpo_stage.cpp's token_logprobs does (each micro-batch's rows right-padded as
// prompt + completion, the final hidden state at position p - 1 + t scoring completion token t,
// lm_head_logprobs at temperature t); in.safetensors' old_logps / ref_logps / mask are (n, T) with
// T >= each micro-batch's longest completion. out.safetensors then holds grad.<name> for every model
// parameter (d Σ loss / d θ) instead of logps_grad, and logps (n, T): the model's ℓ (0 past each
// completion).
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

#include "core/checkpoint/checkpoint.h"
#include "core/model/lm_head_logprobs.h"
#include "core/model/qwen2.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "rl/grpo_loss.h"

namespace {

using namespace ptk;

std::string number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// ℓ and H (B, Tc) of rows [b, e) under `m`, as rl/grpo_stage.cpp's make_slice + token_logprobs.
std::pair<at::Tensor, at::Tensor> model_logprobs(const model::Qwen2Model& m, const std::vector<std::vector<int64_t>>& prompts,
                                                 const std::vector<std::vector<int64_t>>& completions, int64_t b, int64_t e,
                                                 double temperature, int64_t pad_id) {
  const int64_t B = e - b;
  int64_t L = 1, Tc = 1;
  for (int64_t r = b; r < e; ++r) {
    L = std::max<int64_t>(L, prompts[r].size() + completions[r].size());
    Tc = std::max<int64_t>(Tc, completions[r].size());
  }
  std::vector<int64_t> ids(B * L, pad_id), am(B * L, 0), targets, src, dst;
  for (int64_t i = 0; i < B; ++i) {
    const auto& p = prompts[b + i];
    const auto& c = completions[b + i];
    const int64_t lp = static_cast<int64_t>(p.size());
    for (int64_t t = 0; t < lp; ++t) ids[i * L + t] = p[t], am[i * L + t] = 1;
    for (int64_t t = 0; t < static_cast<int64_t>(c.size()); ++t) {
      ids[i * L + lp + t] = c[t];
      am[i * L + lp + t] = 1;
      targets.push_back(c[t]);
      src.push_back(i * L + lp - 1 + t);
      dst.push_back(i * Tc + t);
    }
  }
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  model::ForwardInput in;
  in.input_ids = torch::tensor(ids, i64).view({B, L});
  in.attention_mask = torch::tensor(am, i64).view({B, L});
  model::ForwardOptions fo;
  fo.logits = false;
  auto out = m.forward(in, fo);
  auto h = out.hidden.reshape({-1, out.hidden.size(-1)}).index_select(0, torch::tensor(src, i64));
  model::LogProbOptions lo;
  lo.temperature = temperature;
  auto tl = model::lm_head_logprobs(h, m.lm_head_weight(), torch::tensor(targets, i64), lo);
  auto zeros = torch::zeros({B * Tc}, torch::kFloat32);
  auto d = torch::tensor(dst, i64);
  return {zeros.index_copy(0, d, tl.logprobs).view({B, Tc}), zeros.index_copy(0, d, tl.entropy.detach()).view({B, Tc})};
}

std::vector<std::vector<int64_t>> id_lists(const rapidjson::Value& rows, int which) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& row : rows.GetArray()) {
    out.emplace_back();
    for (const auto& id : row[which].GetArray()) out.back().push_back(id.GetInt64());
  }
  return out;
}

std::string object(const rl::NamedValues& values) {
  std::string s = "{";
  for (size_t i = 0; i < values.size(); ++i)
    s += (i ? ", \"" : "\"") + values[i].first + "\": " + number(values[i].second);
  return s + "}";
}

int run(const std::string& case_path) {
  auto doc = json::parse_file(case_path);
  const std::string dir = case_path.substr(0, case_path.find_last_of('/') + 1);
  auto path = [&](const char* key) { return dir + doc[key].GetString(); };
  checkpoint::TensorMap in = checkpoint::read_safetensors(path("in"));
  auto get = [&](const char* name) { return in.count(name) ? in.at(name).clone() : at::Tensor(); };

  const auto& a = doc["advantage"];
  rl::GrpoAdvantageOptions ao;
  ao.num_generations = a["num_generations"].GetInt64();
  for (const auto& w : a["reward_weights"].GetArray()) ao.reward_weights.push_back(w.GetDouble());
  ao.scale_rewards = a["scale_rewards"].GetString();
  rl::GrpoAdvantages adv = rl::grpo_advantages(get("rewards_per_func"), ao);

  const auto& l = doc["loss"];
  rl::GrpoLossOptions lo;
  lo.loss_type = l["loss_type"].GetString();
  lo.importance_sampling_level = l["importance_sampling_level"].GetString();
  lo.beta = l["beta"].GetDouble();
  lo.epsilon = l["epsilon"].GetDouble();
  if (l.HasMember("epsilon_high")) lo.epsilon_high = l["epsilon_high"].GetDouble();
  if (l.HasMember("delta")) lo.delta = l["delta"].GetDouble();
  if (l.HasMember("use_bias_correction_kl")) lo.use_bias_correction_kl = l["use_bias_correction_kl"].GetBool();
  lo.top_entropy_quantile = l["top_entropy_quantile"].GetDouble();
  lo.max_completion_length = l["max_completion_length"].GetInt64();
  lo.sapo_temperature_pos = l["sapo_temperature_pos"].GetDouble();
  lo.sapo_temperature_neg = l["sapo_temperature_neg"].GetDouble();

  const bool model_mode = doc.HasMember("model");
  model::Qwen2Model policy;
  std::vector<std::vector<int64_t>> prompts, completions;
  at::Tensor logps, entropy;  // leaf mode: the leaf the gradient is taken at, and H
  if (model_mode) {
    policy = model::Qwen2Model::from_pretrained(doc["model"].GetString());
    policy.set_requires_grad(true);
    prompts = id_lists(doc["rows"], 0);
    completions = id_lists(doc["rows"], 1);
  } else {
    logps = get("logps").set_requires_grad(true);
    entropy = get("entropy");
  }
  at::Tensor old_logps = get("old_logps"), ref_logps = get("ref_logps");
  at::Tensor mask = get("mask");
  const auto& mbs = doc["micro_batches"].GetArray();
  rl::GrpoScaling sc;  // as rl/grpo_stage.cpp on one process
  if (lo.loss_type == "dapo" || lo.loss_type == "cispo")
    sc.num_items_in_batch = std::max(1.0, mask.sum().item<double>());
  else
    sc.accumulation_steps = static_cast<int64_t>(mbs.Size());

  std::vector<double> losses;
  std::string metrics = "[";
  at::Tensor model_logps = torch::zeros(mask.sizes(), torch::kFloat32);  // model mode: ℓ of every micro-batch
  for (const auto& mb : mbs) {
    const int64_t b = mb[0].GetInt64(), e = mb[1].GetInt64();
    rl::GrpoMicroBatch batch;
    int64_t T = mask.size(1);
    if (model_mode) {
      std::tie(batch.logps, batch.entropy) = model_logprobs(policy, prompts, completions, b, e,
                                                            doc["temperature"].GetDouble(), doc["pad_id"].GetInt64());
      T = batch.logps.size(1);
    }
    auto rows = [&](const at::Tensor& t) { return t.defined() ? t.slice(0, b, e).slice(1, 0, T) : at::Tensor(); };
    if (!model_mode) {
      batch.logps = rows(logps);
      batch.entropy = rows(entropy);
    }
    batch.old_logps = rows(old_logps);
    batch.ref_logps = rows(ref_logps);
    batch.mask = rows(mask);
    batch.advantages = adv.advantages.slice(0, b, e);
    if (model_mode) model_logps.slice(0, b, e).slice(1, 0, T).copy_(batch.logps.detach());
    rl::GrpoLossOutput out = rl::grpo_loss(batch, lo, sc);
    out.loss.backward();
    losses.push_back(out.loss.item<double>());
    metrics += (metrics.size() > 1 ? ", " : "") + object(rl::grpo_loss_metrics(out.metrics));
  }
  metrics += "]";

  checkpoint::NamedTensors outs = {{"advantages", adv.advantages},
                                   {"rewards", adv.rewards},
                                   {"loss", torch::tensor(losses, torch::kFloat64)}};
  if (model_mode) {
    outs.emplace_back("logps", model_logps);
    for (auto& [name, p] : policy.named_parameters()) outs.emplace_back("grad." + name, p.grad());
  } else {
    outs.emplace_back("logps_grad", logps.grad());
  }
  checkpoint::write_safetensors(path("out"), outs);
  write_file_atomic(path("metrics_out"), "{\"advantage_metrics\": " + object(adv.metrics) +
                                             ", \"micro_batches\": " + metrics + "}\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: grpo_loss_probe CASE.json\n");
    return 2;
  }
  try {
    return run(argv[1]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "grpo_loss_probe: %s\n", e.what());
    return 1;
  }
}
