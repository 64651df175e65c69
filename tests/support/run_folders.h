// Reading two finished run folders side by side, for the stages' invariant tests (splits, ranks,
// resume): final/model.safetensors through core/checkpoint's reader, and metrics.jsonl line by
// line, and comparing them. Test code only; each tolerance is stated and justified by the test that
// passes it.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/checkpoint/checkpoint.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::test {

// The tensors of an HF folder, by name.
inline std::map<std::string, at::Tensor> folder_params(const std::string& hf_dir) {
  auto m = checkpoint::read_checkpoint_tensors(hf_dir);
  return {m.begin(), m.end()};
}
// The tensors of <run_dir>/final, by name.
inline std::map<std::string, at::Tensor> final_params(const std::string& run_dir) {
  return folder_params(run_dir + "/final");
}

// max |a - b| over every tensor of two runs' final/ (in float64, so bf16 weights compare exactly);
// a missing or mis-shaped tensor is a test failure and counts as infinity.
inline double max_param_diff(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  double d = 0;
  EXPECT_EQ(a.size(), b.size()) << "the two runs saved different tensors";
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second.sizes() != t.sizes()) {
      ADD_FAILURE() << name << " is missing or has another shape in the second run";
      return INFINITY;
    }
    EXPECT_EQ(it->second.scalar_type(), t.scalar_type()) << name;
    d = std::max(d, (t.to(torch::kFloat64) - it->second.to(torch::kFloat64)).abs().max().item<double>());
  }
  return d;
}
inline double max_param_diff(const std::string& run_a, const std::string& run_b) {
  return max_param_diff(final_params(run_a), final_params(run_b));
}

// The lines of <run_dir>/metrics.jsonl, parsed.
inline std::vector<rapidjson::Document> metric_docs(const std::string& run_dir) {
  std::vector<rapidjson::Document> out;
  std::istringstream in(read_file(run_dir + "/metrics.jsonl"));
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(json::parse(line, run_dir + "/metrics.jsonl"));
  return out;
}

// The metrics keys that measure the machine rather than the training (time, speed, memory).
inline const std::set<std::string>& timing_keys() {
  static const std::set<std::string> k = {"tokens_per_s", "mfu", "step_time_s", "peak_rss_bytes"};
  return k;
}

// A metrics line without the timing keys, as canonical text: two runs that trained the same way
// give the same string. `drop_eval` also leaves out eval/* (a run stopped by train.max_steps
// evaluates at its last step, which the uninterrupted run does not).
inline std::string without_timing(const rapidjson::Document& d, bool drop_eval = false) {
  std::string out;
  for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
    std::string k = it->name.GetString();
    if (timing_keys().count(k) || (drop_eval && k.rfind("eval/", 0) == 0)) continue;
    out += k + "=" + json::to_string(it->value) + " ";
  }
  return out;
}

// One metric of two runs: numbers within `rel_tol` relative to max(1, |a|); anything else (NaN is
// written as null) equal as JSON text.
inline ::testing::AssertionResult metric_near(const rapidjson::Value& a, const rapidjson::Value& b, double rel_tol) {
  if (!a.IsNumber() || !b.IsNumber()) {
    if (json::to_string(a) == json::to_string(b)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << json::to_string(a) << " vs " << json::to_string(b);
  }
  const double x = a.GetDouble(), y = b.GetDouble();
  if (std::fabs(x - y) <= rel_tol * std::max(1.0, std::fabs(x))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << x << " vs " << y << " (diff " << x - y << ", tolerance " << rel_tol
                                       << " relative to max(1, |a|))";
}

namespace detail {
// metric_near on `key`, which line `a` has; a key `b` lacks is a failure. True when both are numbers.
inline bool expect_metric_near(const rapidjson::Value& a, const rapidjson::Value& b, const char* key, double rel_tol) {
  auto it = b.FindMember(key);
  if (it == b.MemberEnd()) {
    ADD_FAILURE() << key << " is missing in the second run's line";
    return false;
  }
  EXPECT_TRUE(metric_near(a[key], it->value, rel_tol)) << key;
  return a[key].IsNumber() && it->value.IsNumber();
}
}  // namespace detail

// Compares one metrics line `b` with line `a` of another run by metric_near, key by key: every key
// of `a` but the timing keys and `skip`. Returns how many numbers were compared, so that a caller
// can require the comparison not to be empty. The tolerance is the caller's, justified there.
inline size_t expect_metrics_close(const rapidjson::Value& a, const rapidjson::Value& b, double rel_tol,
                                   const std::set<std::string>& skip = {}) {
  size_t numbers = 0;
  for (auto it = a.MemberBegin(); it != a.MemberEnd(); ++it) {
    const std::string k = it->name.GetString();
    if (timing_keys().count(k) || skip.count(k)) continue;
    numbers += detail::expect_metric_near(a, b, k.c_str(), rel_tol);
  }
  return numbers;
}
// The same over `keys` only, those line `a` has (eval/* only on eval steps).
inline size_t expect_listed_metrics_close(const rapidjson::Value& a, const rapidjson::Value& b, double rel_tol,
                                   std::initializer_list<const char*> keys) {
  size_t numbers = 0;
  for (const char* k : keys)
    if (a.HasMember(k)) numbers += detail::expect_metric_near(a, b, k, rel_tol);
  return numbers;
}

// max |end - start| over the tensors both hold: how far training moved the parameters, so that a
// comparison of two runs cannot pass because neither trained.
inline double max_moved(const std::map<std::string, at::Tensor>& start, const std::map<std::string, at::Tensor>& end) {
  double d = 0;
  for (const auto& [name, t] : end) {
    auto it = start.find(name);
    if (it == start.end()) continue;
    d = std::max(d, (t.to(torch::kFloat64) - it->second.to(torch::kFloat64)).abs().max().item<double>());
  }
  return d;
}

// AdamW's state in a checkpoint folder `ckpt` (checkpoints/step-N), by name: exp_avg.*, exp_avg_sq.*
// and, with bf16 weights, master.* (fp32 master weights).
inline std::map<std::string, at::Tensor> optimizer_state(const std::string& ckpt) {
  auto m = checkpoint::read_safetensors(ckpt + "/trainer_state/optimizer.safetensors");
  return {m.begin(), m.end()};
}

// What a stage's checkpoint folder `ckpt` (checkpoints/step-N) holds for an exact resume: the
// loader cursor at micro-batch `batch` of epoch `epoch`, AdamW's moments for every parameter and,
// with bf16 weights, their fp32 master copies (with fp32 weights, none).
inline void expect_resumable_checkpoint(const std::string& ckpt, int64_t epoch, int64_t batch, bool bf16) {
  auto state = json::parse_file(ckpt + "/trainer_state/state.json");
  ASSERT_TRUE(state.HasMember("cursor") && state["cursor"].HasMember("batch")) << json::to_string(state);
  EXPECT_EQ(state["cursor"]["epoch"].GetInt64(), epoch) << json::to_string(state["cursor"]);
  EXPECT_EQ(state["cursor"]["batch"].GetInt64(), batch) << json::to_string(state["cursor"]);
  auto opt = optimizer_state(ckpt);
  size_t moments = 0, masters = 0;
  for (const auto& [name, t] : opt) {
    EXPECT_EQ(t.scalar_type(), torch::kFloat32) << name << ": optimizer state must be fp32";
    if (name.rfind("exp_avg_sq.", 0) == 0) ++moments;
    if (name.rfind("master.", 0) == 0) ++masters;
  }
  const size_t params = checkpoint::read_checkpoint_tensors(ckpt).size();
  EXPECT_EQ(moments, params);
  EXPECT_EQ(masters, bf16 ? params : 0u);
}

}  // namespace ptk::test
