// The `math` verifier on real reference answers from ../shared/data (skips without it): every GSM8K
// test answer and every MATH-500 answer verifies against itself, in the forms models write it, and
// is rejected by its neighbours' answers wherever those differ by value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "reward/verifiers.h"
#include "tests/support/test_util.h"

namespace ptk::reward {
namespace {

struct Row {
  std::string response;  // what a model would write
  std::string label;     // the reference answer
};

std::vector<rapidjson::Document> read_jsonl(const std::string& path) {
  std::vector<rapidjson::Document> out;
  std::ifstream in(path);
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty()) out.push_back(json::parse(line, path + ":" + std::to_string(n)));
  }
  return out;
}

std::string strip_spaces(std::string s) {
  s.erase(std::remove_if(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); }), s.end());
  return s;
}

TEST(VerifiersData, Gsm8kTestAnswers) {
  std::string shared = test::shared_dir();
  if (shared.empty()) PTK_SKIP_WITHOUT("shared") << "../shared not found: GSM8K answers unavailable";
  std::string path = shared + "/data/math/gsm8k/test.jsonl";
  if (!path_exists(path)) PTK_SKIP_WITHOUT("shared") << path << " not found";
  std::vector<Row> rows;
  std::vector<double> values;  // the test's own reading of each label: digits and commas only
  for (auto& d : read_jsonl(path)) {
    std::string full = d["answer"].GetString();
    size_t p = full.rfind("#### ");
    ASSERT_NE(p, std::string::npos) << full;
    std::string label = full.substr(p + 5);
    std::string digits;
    for (char c : label)
      if (c != ',') digits += c;
    char* end = nullptr;
    values.push_back(std::strtod(digits.c_str(), &end));
    ASSERT_EQ(*end, '\0') << "GSM8K label is not a plain number: " << label;
    rows.push_back({full, label});
  }
  ASSERT_EQ(rows.size(), 1319u);
  size_t rejected = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& label = rows[i].label;
    EXPECT_EQ(verify_math(rows[i].response, label), 1.0) << i << ": " << label;
    EXPECT_EQ(verify_math("So the total is " + label + ". The answer is " + label + ".", label), 1.0) << label;
    EXPECT_EQ(verify_math("Thus $\\boxed{" + label + "}$", label), 1.0) << label;
    EXPECT_EQ(verify_math(rows[i].response, rows[i].response), 1.0) << "whole solution as label, " << i;
    size_t j = (i + 1) % rows.size();
    if (values[i] != values[j]) {
      EXPECT_EQ(verify_math(rows[j].response, label), 0.0) << i << ": " << label << " vs " << rows[j].label;
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 1200u);
}

TEST(VerifiersData, Math500Answers) {
  std::string shared = test::shared_dir();
  if (shared.empty()) PTK_SKIP_WITHOUT("shared") << "../shared not found: MATH-500 answers unavailable";
  std::string path = shared + "/data/math/eval/math500/test.jsonl";
  if (!path_exists(path)) PTK_SKIP_WITHOUT("shared") << path << " not found";
  std::vector<std::string> answers;
  for (auto& d : read_jsonl(path)) answers.push_back(d["answer"].GetString());
  ASSERT_EQ(answers.size(), 500u);
  size_t rejected = 0;
  for (size_t i = 0; i < answers.size(); ++i) {
    const auto& a = answers[i];
    EXPECT_EQ(verify_math("Therefore the final answer is $\\boxed{" + a + "}$.", a), 1.0) << i << ": " << a;
    EXPECT_EQ(verify_math("\\boxed{" + a + "}", "\\boxed{" + a + "}"), 1.0) << i << ": " << a;
    size_t j = (i + 1) % answers.size();
    // Neighbours that differ only in spacing are the same answer, and so is the one pair below
    // (found by this test, checked by hand); every other adjacent pair differs by value.
    bool same_value = strip_spaces(a) == strip_spaces(answers[j]) || (a == "5" && answers[j] == "x=5");
    if (!same_value) {
      EXPECT_EQ(verify_math("\\boxed{" + answers[j] + "}", a), 0.0) << i << ": " << a << " vs " << answers[j];
      ++rejected;
    } else {
      EXPECT_EQ(verify_math("\\boxed{" + answers[j] + "}", a), 1.0) << i << ": " << a << " vs " << answers[j];
    }
  }
  EXPECT_GT(rejected, 450u);
}

}  // namespace
}  // namespace ptk::reward
