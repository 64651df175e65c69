// Test helpers for the HF transformers reference data in tests/fixtures/hf-qwen2 (see its README):
// paths, the padded batches of inputs.json, and tolerance checks that report the max difference.
// Not assertions on their own: tests EXPECT on what these return.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/checkpoint/checkpoint.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"

namespace ptk::test {

inline std::string fixture_dir(const std::string& config = "") {
  std::string d = source_dir() + "/tests/fixtures/hf-qwen2";
  return config.empty() ? d : d + "/" + config;
}

struct Batch {
  at::Tensor ids, mask, labels, positions;  // (B, T) int64 each
};

inline at::Tensor int_matrix(const rapidjson::Value& v) {
  std::vector<int64_t> flat;
  int64_t rows = v.Size(), cols = rows ? v[0].Size() : 0;
  for (const auto& r : v.GetArray())
    for (const auto& x : r.GetArray()) flat.push_back(x.GetInt64());
  return torch::tensor(flat, torch::kLong).view({rows, cols});
}

// "right_padded" or "left_padded" of inputs.json.
inline Batch load_batch(const std::string& config, const std::string& which) {
  auto doc = json::parse_file(fixture_dir(config) + "/inputs.json");
  const auto& b = doc[which.c_str()];
  return {int_matrix(b["input_ids"]), int_matrix(b["attention_mask"]), int_matrix(b["labels"]),
          int_matrix(b["position_ids"])};
}

// A JSON array of ids (expected.json's prompt_ids, new_ids; `ptk generate`'s output) as a vector.
inline std::vector<int64_t> ints(const rapidjson::Value& v) {
  std::vector<int64_t> out;
  for (const auto& x : v.GetArray()) out.push_back(x.GetInt64());
  return out;
}

inline rapidjson::Document expected_json(const std::string& config) {
  return json::parse_file(fixture_dir(config) + "/expected.json");
}

inline checkpoint::TensorMap expected_tensors(const std::string& config) {
  return checkpoint::read_safetensors(fixture_dir(config) + "/expected.safetensors");
}

struct Diff {
  double max_abs = 0;
  int64_t violations = 0;
  int64_t compared = 0;
};

// |x - ref| <= atol + rtol |ref| over the entries where `valid` (broadcast over trailing dims) is 1.
inline Diff compare(const at::Tensor& x, const at::Tensor& ref, const at::Tensor& valid, double atol, double rtol) {
  EXPECT_EQ(x.sizes(), ref.sizes());
  auto a = x.detach().to(torch::kDouble), r = ref.detach().to(torch::kDouble);
  auto err = (a - r).abs();
  auto bad = err > (atol + rtol * r.abs());
  at::Tensor m;
  if (valid.defined()) {
    m = valid.to(torch::kBool);
    while (m.dim() < err.dim()) m = m.unsqueeze(-1);
    m = m.expand(err.sizes());
  } else {
    m = torch::ones_like(err, torch::kBool);
  }
  Diff d;
  d.compared = m.sum().item<int64_t>();
  d.max_abs = d.compared ? err.masked_select(m).max().item<double>() : 0.0;
  d.violations = (bad & m).sum().item<int64_t>();
  return d;
}

#define PTK_EXPECT_CLOSE(what, diff)                                                              \
  do {                                                                                           \
    auto _d = (diff);                                                                            \
    EXPECT_EQ(_d.violations, 0) << what << ": " << _d.violations << " of " << _d.compared       \
                                << " entries out of tolerance, max |diff| " << _d.max_abs;      \
    EXPECT_GT(_d.compared, 0) << what;                                                           \
    std::printf("  %-44s max |diff| %.3g over %lld entries\n", std::string(what).c_str(), _d.max_abs, \
                static_cast<long long>(_d.compared));                                            \
  } while (0)

}  // namespace ptk::test
