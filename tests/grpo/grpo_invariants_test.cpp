// Invariants of the real GRPO stage (GrpoStage on core/train's loop, and `ptk grpo`), each checked
// against numbers this file derives itself, not against the stage's code (issue #32):
// - rollouts/step-N.jsonl alone (rewards per source, lengths, finish reasons, micro-batch of each
//   completion) determines R, the group means and stds, the advantages, the logged reward metrics,
//   completions/*, num_tokens, and, at μ = 1 where the ratio is exactly 1, the step's loss, i.e.
//   each loss type's token normalizer;
// - micro_batch_size × grad_accum splits of the same generation batch end with the same parameters;
// - `ptk launch -n 2 -- ptk grpo` equals `ptk grpo` on the same global batch;
// - a run killed mid-run resumes bit-for-bit (fp32 and bf16), the data cursor, optimizer moments
//   and master weights included.
// Not the loss formulas on hand-made tensors (tests/rl_losses) nor the stage's loss against
// grpo_loss (grpo_stage_test.cpp).
#include <gtest/gtest.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/hf_config.h"
#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/train/from_recipe.h"
#include "core/train/trainer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "rl/grpo_stage.h"
#include "tests/grpo/grpo_test_support.h"
#include "tests/support/crashing_stage.h"
#include "tests/support/run_folders.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk::rl {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The tiny random Qwen2 (untied LM head) with a fixed logit bonus on <|im_end|> (the stop token)
// and on the digit 7; otherwise its next-token distribution stays near uniform. So completions end at
// varied lengths (both finish reasons occur, and the loss types' normalizers differ: about a third
// of the 6-token completions below stop early) and often contain a 7 (the math verifier has spread on
// prompts whose answer is 7). How: dimension 0 of every embedding row is 0.1 (the other 31 are
// ~0.02 each), so dimension 0 of the final hidden state is large (~3.8) at every position, and column
// 0 of the LM head is 0 except for the raised tokens.
void write_biased_model(const std::string& dir, const std::string& tokenizer_dir) {
  std::string cfg = test::kTinyByteModelJson;
  const std::string tied = "\"tie_word_embeddings\": true";
  cfg.replace(cfg.find(tied), tied.size(), "\"tie_word_embeddings\": false");
  auto m = model::Qwen2Model::from_config(checkpoint::parse_config(cfg, "kTinyByteModelJson"), 7);
  torch::NoGradGuard ng;
  for (auto& [name, t] : m.named_parameters()) {
    if (name == "model.embed_tokens.weight") t.select(1, 0).fill_(0.1);
    if (name == "lm_head.weight") {
      auto col = t.select(1, 0);
      col.zero_();
      col[258] = 1.5;  // <|im_end|>
      col['7'] = 1.6;
    }
  }
  checkpoint::SaveOptions so;
  so.source_dir = tokenizer_dir;
  m.save_pretrained(dir, so);
}

// Tokenizer, the model above, 12 prompts "What is i + 1?" (answer i + 1), and a recipe writer.
struct Fixture {
  test::TempDir d;
  Fixture() {
    tasks::write_byte_tokenizer(d.file("tok"));
    write_biased_model(d.file("model"), d.file("tok"));
    d.write("train.jsonl", test_support::what_is_prompts());
    std::string sevens;
    for (int i = 0; i < 8; ++i)
      sevens += "{\"prompt\": \"What is " + std::to_string(i) + " + " + std::to_string(7 - i) + "?\", \"answer\": \"7\"}\n";
    d.write("sevens.jsonl", sevens);
  }
  std::string recipe_file() const {
    return d.write("grpo.json", "{\n"
        "\"run\": {\"seed\": 7},\n"
        "\"model\": {\"path\": \"" + d.file("model") + "\"},\n"
        "\"tokenizer\": {\"path\": \"" + d.file("tok") + "\"},\n"
        "\"data\": {\"train\": [\"" + d.file("train.jsonl") + "\"], \"max_seq_len\": 128},\n"
        "\"train\": {\"max_steps\": 2, \"micro_batch_size\": 4, \"grad_accum\": 2, \"eval_every\": 0},\n"
        "\"optim\": {\"lr\": 1e-3, \"warmup_steps\": 0},\n"
        "\"grpo\": {\"num_generations\": 4, \"max_completion_length\": 6, \"temperature\": 1.5,\n"
        "           \"reward_funcs\": [\"letters\"]}\n}\n");
  }
  // optim.lr 1e-3: runs compared below differ by float rounding (~1e-8 in the gradients), and
  // AdamW's first update lr * g / (|g| + eps) turns that into parameter differences proportional to
  // lr where a gradient entry is itself within ~eps of 0 (here k_proj weights along the hidden
  // state's near-constant dimension 0: attention is shift-invariant in the keys). Measured: max
  // 1.8e-6 at lr 1e-3, 5.5e-6 at 3e-3, beside moves of ~lr a step.
  std::unique_ptr<GrpoRecipe> recipe(const std::string& run, std::vector<std::string> overrides) {
    overrides.push_back("run.dir=" + d.file(run));
    return test_support::bind_recipe(recipe_file(), overrides);
  }
};

double letter_share(const std::string& c) {
  if (c.empty()) return 0.0;
  double n = 0;
  for (unsigned char ch : c) n += (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
  return n / static_cast<double>(c.size());
}

// Reward sources with spread on random text, None (NaN) rewards, unscorable completions and
// zero-std groups: for answers divisible by 4 both are constant (such groups have std 0); otherwise
// `letters_or_none` is the share of ASCII letters, None for an empty completion (the stop token
// alone), and `seven_or_none` is 1 with a 7 in the completion, else 0, None when the completion has
// an odd number of bytes (so an empty completion is unscorable: both None).
std::vector<RewardFunction> rewards() {
  return {{"letters", [](const std::string& c, const std::string&) { return letter_share(c); }},
          {"letters_or_none",
           [](const std::string& c, const std::string& a) {
             if (std::stoi(a) % 4 == 0) return 0.5;
             return c.empty() ? kNaN : letter_share(c);
           }},
          {"seven_or_none", [](const std::string& c, const std::string& a) {
             if (std::stoi(a) % 4 == 0) return 1.0;
             if (c.empty() || c.size() % 2) return kNaN;
             return c.find('7') != std::string::npos ? 1.0 : 0.0;
           }}};
}

using test_support::options_for;

// Runs the stage to train.max_steps in this process; returns its parameters (copies).
std::map<std::string, at::Tensor> train_in_process(GrpoRecipe& r) {
  at::set_num_threads(1);
  GrpoStage stage(r, r.run.dir, {}, rewards());
  train::Trainer(stage, options_for(r)).run();
  std::map<std::string, at::Tensor> out;
  for (auto& [n, t] : stage.parameters()) out[n] = t.detach().clone();
  return out;
}

std::map<std::string, at::Tensor> start_parameters(GrpoRecipe& r) {
  at::set_num_threads(1);
  GrpoStage stage(r, r.run.dir + "-start", {}, rewards());
  std::map<std::string, at::Tensor> out;
  for (auto& [n, t] : stage.parameters()) out[n] = t.detach().clone();
  return out;
}

// ---------------------------------------------------------------------------------------------
// The run folder, read back

struct Line {
  int64_t step = 0, row = 0, length = 0, prompt_length = 0, micro_batch = 0;
  std::string prompt, completion, answer, finish_reason;
  std::vector<double> rewards;  // per source, in `sources` order; NaN = null
  double reward = 0, advantage = 0;  // reward NaN = null
  bool truncated() const { return finish_reason == "length"; }
};

double number_or_nan(const rapidjson::Value& v) { return v.IsNull() ? kNaN : v.GetDouble(); }

std::vector<Line> read_rollouts(const std::string& file, const std::vector<std::string>& sources) {
  std::vector<Line> out;
  std::istringstream in(read_file(file));
  std::string text;
  while (std::getline(in, text)) {
    auto d = json::parse(text, file);
    Line l;
    l.step = d["step"].GetInt64();
    l.row = d["row"].GetInt64();
    l.length = d["length"].GetInt64();
    l.prompt_length = d["prompt_length"].GetInt64();
    l.micro_batch = d["micro_batch"].GetInt64();
    l.prompt = d["prompt"].GetString();
    l.completion = d["completion"].GetString();
    l.answer = d["answer"].GetString();
    l.finish_reason = d["finish_reason"].GetString();
    EXPECT_EQ(d["rewards"].MemberCount(), sources.size()) << text;
    for (auto& s : sources) l.rewards.push_back(number_or_nan(d["rewards"][s.c_str()]));
    l.reward = number_or_nan(d["reward"]);
    l.advantage = d["advantage"].GetDouble();
    out.push_back(std::move(l));
  }
  return out;
}

double metric(const rapidjson::Document& m, const std::string& key) {
  auto it = m.FindMember(key.c_str());
  if (it == m.MemberEnd()) {
    ADD_FAILURE() << "metrics.jsonl step " << m["step"].GetInt64() << " has no " << key;
    return kNaN;
  }
  return number_or_nan(it->value);
}

// ---------------------------------------------------------------------------------------------
// docs/FORMULAS.md 4.2 and 4.4, recomputed in plain doubles

double nan_mean(const std::vector<double>& v) {
  double s = 0;
  int n = 0;
  for (double x : v)
    if (!std::isnan(x)) s += x, ++n;
  return n ? s / n : kNaN;
}
// Unbiased, NaN-ignoring; NaN with fewer than 2 values (trl/trainer/utils.py nanstd).
double nan_std(const std::vector<double>& v) {
  const double m = nan_mean(v);
  double s = 0;
  int n = 0;
  for (double x : v)
    if (!std::isnan(x)) s += (x - m) * (x - m), ++n;
  return n > 1 ? std::sqrt(s / (n - 1)) : kNaN;
}
// Σ_k w_k x_k over the non-NaN terms; NaN when all are NaN.
double weighted_sum(const std::vector<double>& x, const std::vector<double>& w) {
  double s = 0;
  bool any = false;
  for (size_t k = 0; k < x.size(); ++k)
    if (!std::isnan(x[k])) s += w[k] * x[k], any = true;
  return any ? s : kNaN;
}

struct Expected {
  std::vector<double> R, A;
  double frac_zero_std = 0;
};

// `lines`: the global generation batch, groups of G consecutive lines.
Expected recompute_advantages(const std::vector<Line>& lines, int64_t G, const std::vector<double>& w,
                              const std::string& scale_rewards, const std::string& aggregation) {
  const size_t n = lines.size(), K = w.size();
  Expected e;
  std::vector<double> scale_std(n);
  for (auto& l : lines) e.R.push_back(weighted_sum(l.rewards, w));
  e.A.assign(n, 0.0);
  if (aggregation == "sum_then_normalize") {
    const double batch_std = nan_std(e.R);
    for (size_t g = 0; g < n; g += G) {
      std::vector<double> group(e.R.begin() + g, e.R.begin() + g + G);
      const double mu = nan_mean(group), sd = nan_std(group);
      for (size_t i = g; i < g + G; ++i) {
        scale_std[i] = scale_rewards == "batch" ? batch_std : sd;
        double a = e.R[i] - mu;
        if (scale_rewards != "none") a /= scale_std[i] + 1e-4;
        e.A[i] = a;
      }
    }
  } else {  // normalize_then_sum: z-score per source and group, weighted sum, z-score over the batch
    std::vector<double> S(n);
    std::vector<std::vector<double>> z(n, std::vector<double>(K));
    for (size_t g = 0; g < n; g += G)
      for (size_t k = 0; k < K; ++k) {
        std::vector<double> col;
        for (size_t i = g; i < g + G; ++i) col.push_back(lines[i].rewards[k]);
        const double mu = nan_mean(col), sd = nan_std(col);
        for (size_t i = g; i < g + G; ++i) z[i][k] = (lines[i].rewards[k] - mu) / (sd + 1e-4);
      }
    for (size_t i = 0; i < n; ++i) S[i] = weighted_sum(z[i], w);
    const double mu = nan_mean(S), sd = nan_std(S);
    for (size_t i = 0; i < n; ++i) {
      scale_std[i] = sd;
      e.A[i] = (S[i] - mu) / (sd + 1e-4);
    }
  }
  for (double& a : e.A)
    if (std::isnan(a)) a = 0;  // unscorable rows, groups with < 2 scored members
  int zero = 0;
  for (double s : scale_std) zero += std::fabs(s) <= 1e-8;  // torch.isclose(std, 0); NaN is not 0
  e.frac_zero_std = static_cast<double>(zero) / n;
  return e;
}

// Tokens of completion i in the loss: all of them, none when masked as truncated.
int64_t loss_tokens(const Line& l, bool mask_truncated) { return mask_truncated && l.truncated() ? 0 : l.length; }

// One rank's step loss (the sum of its micro-batch losses) at pass 0 with μ = 1, β = 0 and no
// importance-sampling weights: the ratio is exactly 1, so the per-token loss is −A (sapo:
// −(4/τ)·σ(0)·A = −2A/τ, τ = 1 for A > 0, 1.05 otherwise) and the loss types differ only in their
// normalizer (FORMULAS 4.4): dapo Σ/N, grpo and sapo the mean of per-completion token means / K,
// bnpo each micro-batch's token mean / K, dr_grpo Σ / (B · max_completion_length · K). For grpo
// and sapo the token mean of a constant is that constant: the value checks B·K and the masking, not
// the 1/|o_i| weights, which only shape the gradient (grpo_stage_test's
// LossEqualsGrpoLossOnPlainLogprobs checks the loss the stage builds against grpo_loss).
double expected_step_loss(const std::vector<Line>& lines, const std::string& loss_type, int64_t B, int64_t K,
                          int64_t max_len, bool mask_truncated) {
  std::vector<double> sum_k(K, 0.0), tokens_k(K, 0.0);
  double total = 0, tokens = 0, per_completion = 0;
  for (auto& l : lines) {
    const double a = static_cast<float>(l.advantage);  // the stage trains on float32 advantages
    const double p = loss_type == "sapo" ? -2.0 * a / (a > 0 ? 1.0 : 1.05) : -a;
    const double n = static_cast<double>(loss_tokens(l, mask_truncated));
    total += p * n;
    tokens += n;
    per_completion += n > 0 ? p : 0.0;  // (Σ_t m p) / max(Σ_t m, 1)
    sum_k.at(l.micro_batch) += p * n;
    tokens_k.at(l.micro_batch) += n;
  }
  if (loss_type == "dapo") return total / std::max(1.0, tokens);
  if (loss_type == "grpo" || loss_type == "sapo") return per_completion / static_cast<double>(B * K);
  if (loss_type == "dr_grpo") return total / static_cast<double>(B * max_len * K);
  if (loss_type == "bnpo") {
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += sum_k[k] / std::max(1.0, tokens_k[k]) / static_cast<double>(K);
    return s;
  }
  ADD_FAILURE() << "no expected loss for " << loss_type;
  return kNaN;
}

void expect_same_or_both_nan(double got, double want, double tol, const std::string& what) {
  if (std::isnan(want)) EXPECT_TRUE(std::isnan(got)) << what << ": " << got << ", expected null";
  else EXPECT_NEAR(got, want, tol) << what;
}

// Checks one step's rollouts (the global batch) against its metrics line. Returns Σ|A|.
double check_generation_batch(const std::vector<Line>& lines, const rapidjson::Document& m, int64_t G,
                              const std::vector<std::string>& sources, const std::vector<double>& w,
                              const std::string& scale, const std::string& aggregation, const std::string& where) {
  auto e = recompute_advantages(lines, G, w, scale, aggregation);
  double abs_a = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string at = where + " line " + std::to_string(i + 1);
    if (i % G) {  // one prompt per group of G consecutive lines
      EXPECT_EQ(lines[i].row, lines[i - i % G].row) << at;
      EXPECT_EQ(lines[i].prompt, lines[i - i % G].prompt) << at;
    }
    // Both sides are float64 computations of the same formula, differing only in summation
    // order: 1e-9 is far above their rounding (~1e-15) and far below any formula difference.
    expect_same_or_both_nan(lines[i].reward, e.R[i], 1e-9, at + " reward");
    EXPECT_NEAR(lines[i].advantage, e.A[i], 1e-9) << at << " advantage";
    abs_a += std::fabs(e.A[i]);
  }
  // Logged metrics of the generation batch (rapidjson writes doubles exactly): same tolerance.
  expect_same_or_both_nan(metric(m, "reward"), nan_mean(e.R), 1e-9, where + " reward");
  expect_same_or_both_nan(metric(m, "reward_std"), nan_std(e.R), 1e-9, where + " reward_std");
  EXPECT_NEAR(metric(m, "frac_reward_zero_std"), e.frac_zero_std, 1e-12) << where;
  for (size_t k = 0; k < sources.size(); ++k) {
    std::vector<double> col;
    for (auto& l : lines) col.push_back(l.rewards[k]);
    expect_same_or_both_nan(metric(m, "rewards/" + sources[k] + "/mean"), nan_mean(col), 1e-9, where + " mean " + sources[k]);
    expect_same_or_both_nan(metric(m, "rewards/" + sources[k] + "/std"), nan_std(col), 1e-9, where + " std " + sources[k]);
  }
  // completions/*: lengths up to and including the stop token, before truncation masking.
  double sum = 0, mn = 1e9, mx = 0, clipped = 0, tsum = 0, tmn = 1e9, tmx = 0, terminated = 0;
  for (auto& l : lines) {
    const double len = static_cast<double>(l.length);
    sum += len, mn = std::min(mn, len), mx = std::max(mx, len);
    if (l.truncated()) {
      ++clipped;
    } else {
      ++terminated, tsum += len, tmn = std::min(tmn, len), tmx = std::max(tmx, len);
    }
  }
  const double n = static_cast<double>(lines.size());
  EXPECT_NEAR(metric(m, "completions/mean_length"), sum / n, 1e-12) << where;
  EXPECT_EQ(metric(m, "completions/min_length"), mn) << where;
  EXPECT_EQ(metric(m, "completions/max_length"), mx) << where;
  EXPECT_NEAR(metric(m, "completions/clipped_ratio"), clipped / n, 1e-12) << where;
  EXPECT_NEAR(metric(m, "completions/mean_terminated_length"), terminated ? tsum / terminated : 0.0, 1e-12) << where;
  EXPECT_EQ(metric(m, "completions/min_terminated_length"), terminated ? tmn : 0.0) << where;
  EXPECT_EQ(metric(m, "completions/max_terminated_length"), terminated ? tmx : 0.0) << where;
  return abs_a;
}

// ---------------------------------------------------------------------------------------------

// For each loss type (and every scale_rewards and aggregation between them), 3 steps of 4 prompts
// x G = 4, 4 micro-batches of 4, μ = 1, β = 0, no sampler IS correction: the rollouts file
// determines the advantages, the generation metrics, num_tokens and every step's loss (cispo's loss
// needs the log-probs, which the file does not hold; its normalizer is dapo's N, the same code
// path). Truncated completions are masked except for bnpo (whose micro-batches, cut after the shuffle,
// mix groups): advantages sum to ~0 over a group, so over whole groups the loss would be ~0 and
// check nothing.
TEST(GrpoInvariants, RolloutsDetermineAdvantagesMetricsAndTheLossNormalizer) {
  struct Case {
    const char *loss_type, *scale, *aggregation;
    bool mask_truncated;
  };
  const Case cases[] = {{"dapo", "group", "sum_then_normalize", true},
                        {"grpo", "batch", "sum_then_normalize", true},
                        {"dr_grpo", "none", "sum_then_normalize", true},
                        {"bnpo", "group", "normalize_then_sum", false},
                        {"sapo", "group", "sum_then_normalize", true}};
  const std::vector<std::string> sources = {"letters_or_none", "seven_or_none"};
  const std::vector<double> w = {1.0, 0.5};
  const int64_t G = 4, B = 4, K = 4, steps = 3, max_len = 6;
  int nulls = 0, unscorable = 0, zero_std_steps = 0, truncated = 0, terminated = 0;
  for (const Case& c : cases) {
    Fixture f;
    auto r = f.recipe("run", {std::string("grpo.loss_type=") + c.loss_type,
                              std::string("grpo.scale_rewards=") + c.scale,
                              std::string("grpo.multi_objective_aggregation=") + c.aggregation,
                              "grpo.reward_funcs=[\"letters_or_none\", \"seven_or_none\"]",
                              "grpo.reward_weights=[1.0, 0.5]", "grpo.vllm_importance_sampling_correction=false",
                              std::string("grpo.mask_truncated_completions=") + (c.mask_truncated ? "true" : "false"),
                              "train.micro_batch_size=4", "train.grad_accum=4", "train.max_steps=3"});
    train_in_process(*r);
    auto metrics = test::metric_docs(r->run.dir);
    ASSERT_EQ(metrics.size(), static_cast<size_t>(steps)) << c.loss_type;
    double num_tokens = 0, abs_a = 0;
    int nontrivial_losses = 0;
    for (int64_t step = 1; step <= steps; ++step) {
      const std::string where = std::string(c.loss_type) + " step " + std::to_string(step);
      auto lines = read_rollouts(r->run.dir + "/rollouts/step-" + std::to_string(step) + ".jsonl", sources);
      ASSERT_EQ(lines.size(), static_cast<size_t>(B * K)) << where;
      const auto& m = metrics[step - 1];
      abs_a += check_generation_batch(lines, m, G, sources, w, c.scale, c.aggregation, where);
      std::vector<int> per_micro_batch(K, 0);
      for (auto& l : lines) {
        ASSERT_TRUE(l.micro_batch >= 0 && l.micro_batch < K) << where;
        ++per_micro_batch[l.micro_batch];
        num_tokens += static_cast<double>(l.prompt_length + l.length);
        for (double x : l.rewards) nulls += std::isnan(x);
        unscorable += std::isnan(l.rewards[0]) && std::isnan(l.rewards[1]);
        (l.truncated() ? truncated : terminated) += 1;
      }
      for (int64_t k = 0; k < K; ++k) EXPECT_EQ(per_micro_batch[k], B) << where << " micro-batch " << k;
      EXPECT_EQ(metric(m, "num_tokens"), num_tokens) << where << ": prompt + completion tokens so far";
      zero_std_steps += metric(m, "frac_reward_zero_std") > 0;
      // The loss is float32 (sums of <= 96 terms |A| <= ~3, normalizers >= 1): rounding stays below
      // 1e-5, while a wrong normalizer (one token more in an N of <= 96, K for B·K) moves a loss
      // above 1e-2 by more than 1e-4.
      const double want = expected_step_loss(lines, c.loss_type, B, K, max_len, c.mask_truncated);
      EXPECT_NEAR(metric(m, "loss"), want, 1e-5) << where;
      nontrivial_losses += std::fabs(want) > 1e-2;
    }
    EXPECT_GT(abs_a, 0.1) << c.loss_type << ": no advantage spread, the loss checks prove nothing";
    // A loss of ~0 (every stopped completion unscorable, say) checks no normalizer.
    EXPECT_GE(nontrivial_losses, 2) << c.loss_type << ": fewer than 2 of the 3 steps have a loss above 1e-2";
  }
  std::printf("over all cases: %d None rewards, %d unscorable completions, %d steps with zero-std groups, %d "
              "truncated and %d stopped completions\n", nulls, unscorable, zero_std_steps, truncated, terminated);
  // The fixture must exercise None rewards, unscorable completions, zero-std groups and both
  // finish reasons.
  EXPECT_GT(nulls, 0);
  EXPECT_GT(unscorable, 0);
  EXPECT_GT(zero_std_steps, 0);
  EXPECT_GT(truncated, 0);
  EXPECT_GT(terminated, 0);
}


// micro_batch_size x grad_accum = 8 (2 prompts x G = 4 a step) cut 8x1, 4x2 and 1x8: the generation
// batch is the same (prompts, sampling seeds and the shuffle do not depend on the split), only the
// micro-batches differ. Every loss type whose step objective does not depend on the micro-batch
// (all but bnpo, FORMULAS 4.4) ends with the same parameters after 4 steps: 2 generation batches x
// μ = 2 passes, so ratios != 1, clipping, the β KL term and the sampler IS weights all take part.
TEST(GrpoInvariants, MicroBatchSplitsGiveTheSameParameters) {
  struct Split {
    int64_t B, K;
  };
  const Split splits[] = {{8, 1}, {4, 2}, {1, 8}};
  auto overrides = [](const std::string& lt, Split s) {
    return std::vector<std::string>{"grpo.loss_type=" + lt, "grpo.num_iterations=2", "train.max_steps=4",
                                    "grpo.beta=0.04",
                                    // cispo's epsilon_high is an absolute cap on the ratio (paper: 5)
                                    lt == "cispo" ? "grpo.epsilon_high=5" : "grpo.epsilon_high=0.28",
                                    "train.micro_batch_size=" + std::to_string(s.B),
                                    "train.grad_accum=" + std::to_string(s.K)};
  };
  Fixture f;
  auto start = start_parameters(*f.recipe("start", {}));
  const std::vector<std::string> sources = {"letters"};
  for (const std::string lt : {"dapo", "grpo", "dr_grpo", "cispo", "sapo"}) {
    std::map<std::string, at::Tensor> ref;
    std::string ref_dir;
    for (const Split& s : splits) {
      auto r = f.recipe(lt + "-" + std::to_string(s.B) + "x" + std::to_string(s.K), overrides(lt, s));
      auto p = train_in_process(*r);
      if (ref.empty()) {
        ref = p;
        ref_dir = r->run.dir;
        ASSERT_GT(test::max_param_diff(ref, start), 5e-4) << lt << ": training did not move the parameters";
        continue;
      }
      const std::string where = lt + " " + std::to_string(s.B) + "x" + std::to_string(s.K);
      // The same generation batches (steps 1 and 3), only cut differently.
      for (int step : {1, 3}) {
        const std::string file = "/rollouts/step-" + std::to_string(step) + ".jsonl";
        auto a = read_rollouts(ref_dir + file, sources), b = read_rollouts(r->run.dir + file, sources);
        ASSERT_EQ(a.size(), b.size()) << where;
        for (size_t i = 0; i < a.size(); ++i) {
          EXPECT_EQ(a[i].completion, b[i].completion) << where << " step " << step << " line " << i + 1;
          EXPECT_EQ(a[i].advantage, b[i].advantage) << where << " step " << step << " line " << i + 1;
        }
      }
      // Each step's loss (float32, |loss| < 3) and pre-clip gradient norm agree to summation order
      // (measured <= 1e-6); a split-dependent normalizer would move them by far more, and grad_norm
      // shows a wrong scale that AdamW's scale-invariant update (and clipping) would hide.
      auto ma = test::metric_docs(ref_dir), mb = test::metric_docs(r->run.dir);
      ASSERT_EQ(ma.size(), mb.size()) << where;
      for (size_t i = 0; i < ma.size(); ++i) {
        EXPECT_NEAR(metric(mb[i], "loss"), metric(ma[i], "loss"), 1e-5) << where << " step " << i + 1;
        EXPECT_NEAR(metric(mb[i], "grad_norm") / metric(ma[i], "grad_norm"), 1.0, 1e-5) << where << " step " << i + 1;
      }
      // fp32; the splits differ only in summation order and padding (~1e-7 per step).
      const double d = test::max_param_diff(p, ref);
      std::printf("%s %lldx%lld vs 8x1 after 4 steps: max |param diff| %.3g\n", lt.c_str(), static_cast<long long>(s.B),
                  static_cast<long long>(s.K), d);
      EXPECT_LT(d, 1e-5) << lt << " " << s.B << "x" << s.K << " vs 8x1: max |param diff| " << d;
    }
  }
  // The control: bnpo normalizes each micro-batch by its own token count, so 4x2 differs from 8x1
  // whenever the two micro-batches hold different token counts (which the rollouts show): the
  // comparison above sees a normalizer that depends on the split.
  auto r8 = f.recipe("bnpo-8x1", overrides("bnpo", {8, 1})), r4 = f.recipe("bnpo-4x2", overrides("bnpo", {4, 2}));
  auto p8 = train_in_process(*r8), p4 = train_in_process(*r4);
  auto lines = read_rollouts(r4->run.dir + "/rollouts/step-1.jsonl", {"letters"});
  int64_t tokens[2] = {0, 0};
  for (auto& l : lines) tokens[l.micro_batch] += l.length;
  ASSERT_NE(tokens[0], tokens[1]) << "equal micro-batch token counts: bnpo cannot tell the splits apart";
  std::printf("bnpo 4x2 vs 8x1 (differs by design): max |param diff| %.3g\n", test::max_param_diff(p8, p4));
  EXPECT_GT(test::max_param_diff(p8, p4), 1e-4) << "bnpo gave the same parameters for 8x1 and 4x2";
}

// ---------------------------------------------------------------------------------------------
// Two ranks (`ptk launch -n 2 -- ptk grpo`) against one (`ptk grpo`), the same global batch of
// 2 prompts x G = 4 a step: 2 ranks x micro-batch 4 x grad_accum 1 vs 1 rank x 4 x 2.
//
// How ptk splits a generation batch over ranks: the global batch is the next world x
// prompts_per_rank prompts of the epoch's seeded order, rank r taking the r-th consecutive block;
// each prompt's G samples are seeded by (run.seed, generation batch, prompt row) alone and the
// rollout engine's draws do not depend on the batch it runs in (rollout/engine.h: on CPU fp32 the
// ids agree alone or in any mix). Rewards are gathered over ranks before the advantages. So rank 0's
// rollouts followed by rank 1's must equal the 1-rank rollouts line by line: prompts, completions,
// rewards and advantages exactly. What differs by design: each rank shuffles its own completions
// before cutting micro-batches (the `micro_batch` field), and bnpo's per-micro-batch normalizer
// then differs, so bnpo is left out; the others make the step gradient a function of the global
// batch (dapo: Σ/N with N summed over ranks; grpo: 1/(B·K·P)), equal up to summation order.

std::string shell_quote(const std::string& s) { return "'" + s + "'"; }

TEST(GrpoInvariants, TwoRanksEqualOneRank) {
  Fixture f;
  const std::string recipe = f.recipe_file();
  const std::vector<std::string> sources = {"math"};
  // The math verifier on prompts whose answer is 7: the model often writes a 7 (write_biased_model),
  // so groups mix rewards 0 and 1 (checked below: no spread, no gradient, nothing compared).
  const std::string common = " --recipe " + recipe + " --threads 1 grpo.reward_funcs=" + shell_quote("[\"math\"]") +
                             " data.train=" + shell_quote("[\"" + f.d.file("sevens.jsonl") + "\"]") +
                             " grpo.max_completion_length=12 train.micro_batch_size=4";
  // The update with ZeRO-2 (train.sharding=zero2: gradients reduce-scattered into per-rank shards,
  // AdamW on the shards): dapo only, the same comparison.
  for (const std::string lt : {"dapo", "grpo", "dapo-zero2"}) {
    const bool zero2 = lt == "dapo-zero2";
    const std::string loss = zero2 ? "dapo" : lt;
    const std::string one = f.d.file("one-" + loss), two = f.d.file("two-" + lt);  // zero2: dapo's 1-rank run
    if (!zero2) {
      auto r1 = test::run(test::ptk_binary() + " grpo" + common + " grpo.loss_type=" + loss + " train.grad_accum=2 run.dir=" + one);
      ASSERT_EQ(r1.exit_code, 0) << r1.out;
    }
    auto r2 = test::run(test::ptk_binary() + " launch -n 2 -- " + test::ptk_binary() + " grpo" + common +
                        " grpo.loss_type=" + loss + " train.grad_accum=1 run.dir=" + two +
                        (zero2 ? " train.sharding=zero2" : ""));
    ASSERT_EQ(r2.exit_code, 0) << r2.out;
    EXPECT_NE(r2.out.find(zero2 ? "data parallel: 2 ranks over gloo, train.sharding=zero2 (" : "train.sharding=none"),
              std::string::npos)
        << r2.out;
    auto m1 = test::metric_docs(one), m2 = test::metric_docs(two);
    ASSERT_EQ(m1.size(), 2u);
    ASSERT_EQ(m2.size(), 2u);
    double abs_a = 0;
    for (int step = 1; step <= 2; ++step) {
      const std::string where = lt + " step " + std::to_string(step);
      const std::string s = "/rollouts/step-" + std::to_string(step);
      auto a = read_rollouts(one + s + ".jsonl", sources);
      auto b = read_rollouts(two + s + ".jsonl", sources), b1 = read_rollouts(two + s + ".rank-1.jsonl", sources);
      ASSERT_EQ(b.size(), 4u) << where << ": rank 0 holds 1 prompt x G";
      ASSERT_EQ(b1.size(), 4u) << where;
      b.insert(b.end(), b1.begin(), b1.end());
      ASSERT_EQ(a.size(), b.size()) << where;
      for (size_t i = 0; i < a.size(); ++i) {
        const std::string at = where + " line " + std::to_string(i + 1);
        EXPECT_EQ(a[i].row, b[i].row) << at;
        EXPECT_EQ(a[i].prompt_length, b[i].prompt_length) << at;
        EXPECT_EQ(a[i].completion, b[i].completion) << at;
        EXPECT_EQ(a[i].length, b[i].length) << at;
        EXPECT_EQ(a[i].finish_reason, b[i].finish_reason) << at;
        EXPECT_EQ(a[i].rewards, b[i].rewards) << at;
        EXPECT_EQ(a[i].advantage, b[i].advantage) << at;
      }
      // The global batch's advantages and metrics, recomputed from the gathered rollouts.
      abs_a += check_generation_batch(b, m2[step - 1], 4, sources, {1.0}, "group", "sum_then_normalize", where + " (2 ranks)");
      check_generation_batch(a, m1[step - 1], 4, sources, {1.0}, "group", "sum_then_normalize", where + " (1 rank)");
      EXPECT_EQ(metric(m1[step - 1], "num_tokens"), metric(m2[step - 1], "num_tokens")) << where;
      // The loss summed over ranks and micro-batches, and the pre-clip gradient norm: float32,
      // summed in another order.
      EXPECT_NEAR(metric(m1[step - 1], "loss"), metric(m2[step - 1], "loss"), 1e-6) << where;
      EXPECT_NEAR(metric(m2[step - 1], "grad_norm") / metric(m1[step - 1], "grad_norm"), 1.0, 1e-5) << where;
    }
    ASSERT_GT(abs_a, 0.1) << lt << ": the math reward had no spread, so no gradient: a vacuous comparison";
    auto p1 = test::final_params(one), p2 = test::final_params(two);
    // fp32 parameters after 2 AdamW steps from gradients that differ in summation order (~1e-7).
    const double d = test::max_param_diff(p1, p2);
    EXPECT_GT(test::max_param_diff(p1, test::folder_params(f.d.file("model"))), 5e-4) << lt << ": nothing trained";
    std::printf("%s: 2 ranks vs 1 rank after 2 steps: max |param diff| %.3g\n", lt.c_str(), d);
    EXPECT_LT(d, 1e-5) << lt;
  }
}

// ---------------------------------------------------------------------------------------------
// Resume.

// A run killed in epoch 2 resumes bit-for-bit, in fp32 and in bf16 (model.dtype=bfloat16: bf16
// parameters, AdamW's fp32 master weights and moments). μ = 2, 4 prompts per generation batch,
// 12 prompts: epoch 1 is steps 1-6, epoch 2 (variance-first order, from the variances of epoch 1)
// starts at step 7; checkpoints every 2 steps; the crash comes at step 10's first micro-batch, so
// the resumed run restores step 8's checkpoint (mid epoch 2) and regenerates step 9's batch from the
// restored data cursor. Beyond grpo_stage_test's ResumeAfterAKillIsBitForBit (fp32, losses and final
// weights): the optimizer state itself (exp_avg, exp_avg_sq, fp32 master weights) and the trainer
// state (steps, tokens, data cursor with the variance table) of the last checkpoint are compared.
TEST(GrpoInvariants, ResumeIsBitForBitWithOptimizerStateAndCursor) {
  for (const std::string dtype : {"float32", "bfloat16"}) {
    Fixture f;
    const std::vector<std::string> ov = {"model.dtype=" + dtype, "grpo.num_iterations=2", "train.max_steps=10",
                                         "train.micro_batch_size=8", "train.grad_accum=2", "checkpoint.every=2",
                                         "grpo.prompt_order=variance_first", "grpo.beta=0.05", "grpo.epsilon_high=0.28"};
    at::set_num_threads(1);
    auto rr = f.recipe("ref", ov);
    {
      GrpoStage s(*rr, rr->run.dir, {}, rewards());
      train::Trainer(s, options_for(*rr)).run();
      for (auto& [n, t] : s.parameters())
        ASSERT_EQ(t.scalar_type(), dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat32) << n;
    }
    auto rc = f.recipe("crash", ov);
    {
      GrpoStage s(*rc, rc->run.dir, {}, rewards());
      test::CrashingStage c(s, 19);  // step 10's first micro-batch; the last checkpoint is step 8's
      EXPECT_THROW(train::Trainer(c, options_for(*rc)).run(), test::Crash);
    }
    {
      GrpoStage s(*rc, rc->run.dir, {}, rewards());
      EXPECT_EQ(train::Trainer(s, options_for(*rc)).run(), 2) << dtype;
    }
    auto mr = test::metric_docs(rr->run.dir), mc = test::metric_docs(rc->run.dir);
    ASSERT_EQ(mr.size(), 10u) << dtype;
    ASSERT_EQ(mc.size(), 10u) << dtype;
    for (size_t i = 0; i < mr.size(); ++i)
      EXPECT_EQ(metric(mc[i], "loss"), metric(mr[i], "loss")) << dtype << " step " << i + 1;
    // Step 9's batch: generated after the resume, the second of epoch 2.
    auto rows = [&](const std::string& dir, int step) {
      std::set<int64_t> out;
      for (auto& l : read_rollouts(dir + "/rollouts/step-" + std::to_string(step) + ".jsonl", {"letters"}))
        out.insert(l.row);
      return out;
    };
    std::set<int64_t> epoch2 = rows(rr->run.dir, 7), step9 = rows(rr->run.dir, 9);
    epoch2.insert(step9.begin(), step9.end());
    EXPECT_EQ(epoch2.size(), 8u) << dtype << ": steps 7 and 9 should draw 8 distinct prompts of epoch 2";
    EXPECT_EQ(read_file(rc->run.dir + "/rollouts/step-9.jsonl"), read_file(rr->run.dir + "/rollouts/step-9.jsonl"))
        << dtype;
    auto a = checkpoint::read_checkpoint_tensors(rr->run.dir + "/final");
    auto b = checkpoint::read_checkpoint_tensors(rc->run.dir + "/final");
    for (auto& [name, t] : a) EXPECT_TRUE(torch::equal(t, b.at(name))) << dtype << " " << name;
    const std::string ts = "/checkpoints/step-10/trainer_state/";
    auto oa = test::optimizer_state(rr->run.dir + "/checkpoints/step-10");
    auto ob = test::optimizer_state(rc->run.dir + "/checkpoints/step-10");
    ASSERT_EQ(oa.size(), ob.size()) << dtype;
    int masters = 0, moments = 0;
    for (auto& [name, t] : oa) {
      ASSERT_TRUE(ob.count(name)) << dtype << " " << name;
      EXPECT_TRUE(torch::equal(t, ob.at(name))) << dtype << " " << name;
      masters += name.rfind("master.", 0) == 0;
      moments += name.rfind("exp_avg.", 0) == 0;
    }
    EXPECT_GT(moments, 0) << dtype;
    EXPECT_EQ(masters, dtype == "bfloat16" ? moments : 0) << dtype << ": fp32 master weights for bf16 parameters only";
    EXPECT_EQ(read_file(rc->run.dir + ts + "state.json"), read_file(rr->run.dir + ts + "state.json")) << dtype;
  }
}

// The data cursor carries doubles (variance_first's per-prompt variances): restore_cursor then
// cursor_json gives back the same text. Before json::parse used full precision, RapidJSON read about
// a quarter of random doubles 1 ulp off what its Writer wrote (0.0017006802721088435 came back as
// ...437), and a resumed run's variance table drifted from the uninterrupted run's.
TEST(GrpoInvariants, CursorWithVariancesRoundTripsExactly) {
  Fixture f;
  auto r = f.recipe("run", {"grpo.prompt_order=variance_first"});
  GrpoStage stage(*r, r->run.dir, {}, rewards());
  const std::string fresh = stage.cursor_json();
  const std::string nulls = "[null,null,null,null,null,null,null,null,null,null,null,null]";
  ASSERT_NE(fresh.find(nulls), std::string::npos) << fresh;
  // 12 variances written as the stage writes them (RapidJSON's Writer); RapidJSON's default parser
  // reads two of them (0.0017006802721088435 and 0.1 + 0.2) 1 ulp off.
  const double values[12] = {0.0017006802721088435, kNaN, 0.1 + 0.2, 0.008894557823129253, 1e-300,
                             2.2250738585072014e-308, 5e-324, 123456.78901234567, 0.0027488425925925924,
                             1.7976931348623157e308, 0.0, kNaN};
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  w.StartArray();
  for (double v : values) std::isnan(v) ? w.Null() : w.Double(v);
  w.EndArray();
  std::string cursor = fresh;
  cursor.replace(cursor.find(nulls), nulls.size(), buf.GetString());
  stage.restore_cursor(cursor);
  EXPECT_EQ(stage.cursor_json(), cursor);
}

}  // namespace
}  // namespace ptk::rl
