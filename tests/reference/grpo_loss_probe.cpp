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
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint.h"
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

  at::Tensor logps = get("logps").set_requires_grad(true);  // the leaf the gradient is taken at
  at::Tensor old_logps = get("old_logps"), ref_logps = get("ref_logps"), entropy = get("entropy");
  at::Tensor mask = get("mask");
  const auto& mbs = doc["micro_batches"].GetArray();
  rl::GrpoScaling sc;  // as rl/grpo_stage.cpp on one process
  if (lo.loss_type == "dapo" || lo.loss_type == "cispo")
    sc.num_items_in_batch = std::max(1.0, mask.sum().item<double>());
  else
    sc.accumulation_steps = static_cast<int64_t>(mbs.Size());

  std::vector<double> losses;
  std::string metrics = "[";
  for (const auto& mb : mbs) {
    const int64_t b = mb[0].GetInt64(), e = mb[1].GetInt64();
    auto rows = [&](const at::Tensor& t) { return t.defined() ? t.slice(0, b, e) : at::Tensor(); };
    rl::GrpoMicroBatch batch;
    batch.logps = rows(logps);
    batch.old_logps = rows(old_logps);
    batch.ref_logps = rows(ref_logps);
    batch.entropy = rows(entropy);
    batch.mask = rows(mask);
    batch.advantages = adv.advantages.slice(0, b, e);
    rl::GrpoLossOutput out = rl::grpo_loss(batch, lo, sc);
    out.loss.backward();
    losses.push_back(out.loss.item<double>());
    metrics += (metrics.size() > 1 ? ", " : "") + object(rl::grpo_loss_metrics(out.metrics));
  }
  metrics += "]";

  checkpoint::write_safetensors(path("out"), {{"advantages", adv.advantages},
                                             {"rewards", adv.rewards},
                                             {"loss", torch::tensor(losses, torch::kFloat64)},
                                             {"logps_grad", logps.grad()}});
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
