// The arithmetic demo task: disjoint and reproducible splits, correct answers in the verifiers'
// format, plausible wrong answers, docs/DESIGN.md's JSONL formats and option errors.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>

#include <set>
#include <sstream>
#include <tuple>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/arithmetic.h"
#include "reward/verifiers.h"
#include "tests/support/test_util.h"

namespace ptk::tasks {
namespace {

using Key = std::tuple<int64_t, char, int64_t>;
Key key(const ArithmeticProblem& p) { return {p.a, p.op, p.b}; }

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

TEST(Arithmetic, ProblemCounts) {
  EXPECT_EQ(arithmetic_problem_count(1, "+"), 100);
  EXPECT_EQ(arithmetic_problem_count(1, "-"), 55);  // a >= b
  EXPECT_EQ(arithmetic_problem_count(1, "+-*"), 255);
  EXPECT_EQ(arithmetic_problem_count(2, "+-*"), 25050);
  EXPECT_EQ(arithmetic_problem_count(1, "++"), 100);  // repeated ops count once
}

TEST(Arithmetic, DefaultsAreTwoDigitAdditionWith300HeldOut) {
  auto s = arithmetic_splits(ArithmeticOptions{});
  EXPECT_EQ(s.eval.size(), 300u);
  EXPECT_EQ(s.train.size(), 9700u);
  for (auto* split : {&s.train, &s.eval})
    for (auto& p : *split) EXPECT_TRUE(p.op == '+' && p.a <= 99 && p.b <= 99) << p.question();
}

// Operands are written with exactly `digits` digits by default (the tiny model finds their units
// digits only then); --operands plain writes them as numbers. Same problems either way.
TEST(Arithmetic, OperandsArePaddedToTheDigitCountUnlessPlain) {
  ArithmeticOptions opt;
  opt.digits = 3;
  opt.train = 200;
  opt.eval = 50;
  auto padded = arithmetic_splits(opt);
  opt.operands = "plain";
  auto plain = arithmetic_splits(opt);
  ASSERT_EQ(padded.train.size(), plain.train.size());
  int short_operands = 0;
  for (size_t i = 0; i < padded.train.size(); ++i) {
    const auto& p = padded.train[i];
    EXPECT_EQ(key(p), key(plain.train[i]));
    char a[16], b[16], op;
    ASSERT_EQ(std::sscanf(p.question().c_str(), "What is %15s %c %15[0-9]?", a, &op, b), 3) << p.question();
    EXPECT_EQ(std::strlen(a), 3u) << p.question();
    EXPECT_EQ(std::strlen(b), 3u) << p.question();
    EXPECT_EQ(std::stoll(a), p.a);
    EXPECT_EQ(std::stoll(b), p.b);
    EXPECT_EQ(plain.train[i].question(), "What is " + std::to_string(p.a) + " + " + std::to_string(p.b) + "?");
    short_operands += p.a < 100 || p.b < 100;
  }
  EXPECT_GT(short_operands, 0) << "no operand below 100: the padding was never exercised";
  ArithmeticProblem q;
  q.a = 4;
  q.b = 90;
  q.width = 2;
  EXPECT_EQ(q.question(), "What is 04 + 90?");
  EXPECT_EQ(q.answer_text(), "The answer is 94.");  // answers are never padded
}

TEST(Arithmetic, SmallSpaceSplitsCoverEveryProblemOnceAndDisjointly) {
  ArithmeticOptions opt;
  opt.digits = 1;
  opt.ops = "+-*";
  opt.eval = 50;  // train 0 = the other 205
  auto s = arithmetic_splits(opt);
  EXPECT_EQ(s.eval.size(), 50u);
  EXPECT_EQ(s.train.size(), 205u);
  std::set<Key> train, eval;
  for (auto& p : s.train) {
    EXPECT_TRUE(train.insert(key(p)).second) << p.question() << " twice in train";
    EXPECT_TRUE(p.a >= 0 && p.a <= 9 && p.b >= 0 && p.b <= 9) << p.question();
    EXPECT_GE(p.answer(), 0) << p.question();
  }
  for (auto& p : s.eval) {
    EXPECT_TRUE(eval.insert(key(p)).second) << p.question() << " twice in eval";
    EXPECT_EQ(train.count(key(p)), 0u) << p.question() << " in both splits";
  }
  std::set<char> ops;
  for (auto& p : s.train) ops.insert(p.op);
  EXPECT_EQ(ops, (std::set<char>{'+', '-', '*'}));
}

TEST(Arithmetic, LargeSpaceIsSampledWithoutRepeats) {
  ArithmeticOptions opt;
  opt.digits = 6;  // 2.5e12 problems: drawn by rejection, not enumerated
  opt.train = 3000;
  opt.eval = 300;
  opt.seed = 7;
  auto s = arithmetic_splits(opt);
  std::set<Key> all;
  for (auto* split : {&s.train, &s.eval})
    for (auto& p : *split) EXPECT_TRUE(all.insert(key(p)).second) << p.question();
  EXPECT_EQ(all.size(), 3300u);
  int64_t big = 0;
  for (auto& p : s.train) big += p.a >= 100000;
  EXPECT_GT(big, 2000);  // operands spread over [0, 10^6)
}

TEST(Arithmetic, SameSeedSameBytesOtherSeedOtherProblems) {
  test::TempDir a, b, c;
  ArithmeticOptions opt;
  opt.digits = 2;
  opt.train = 500;
  opt.eval = 100;
  opt.seed = 3;
  auto fa = write_arithmetic_dataset(a.path(), opt);
  write_arithmetic_dataset(b.path(), opt);
  opt.seed = 4;
  write_arithmetic_dataset(c.path(), opt);
  ASSERT_EQ(fa.size(), 7u);
  for (const char* name : {"sft_train.jsonl", "sft_eval.jsonl", "preference_train.jsonl", "preference_eval.jsonl",
                           "rl_train.jsonl", "rl_eval.jsonl", "manifest.json"}) {
    EXPECT_EQ(read_file(a.file(name)), read_file(b.file(name))) << name;
    if (std::string(name) != "manifest.json") {
      EXPECT_NE(read_file(a.file(name)), read_file(c.file(name))) << name;
    }
  }
  EXPECT_EQ(lines(read_file(a.file("rl_train.jsonl"))).size(), 500u);
  EXPECT_EQ(lines(read_file(a.file("rl_eval.jsonl"))).size(), 100u);
}

TEST(Arithmetic, HeldOutSetDoesNotDependOnTrainSize) {
  ArithmeticOptions opt;
  opt.digits = 2;
  opt.train = 100;
  auto small = arithmetic_splits(opt);
  opt.train = 2000;
  auto big = arithmetic_splits(opt);
  ASSERT_EQ(small.eval.size(), big.eval.size());
  for (size_t i = 0; i < small.eval.size(); ++i) EXPECT_EQ(key(small.eval[i]), key(big.eval[i]));
}

TEST(Arithmetic, FilesFollowDesignFormatsAndVerify) {
  test::TempDir d;
  ArithmeticOptions opt;
  opt.seed = 11;
  opt.digits = 1;
  opt.ops = "+-*";
  opt.eval = 50;
  write_arithmetic_dataset(d.path(), opt);
  auto sft = lines(read_file(d.file("sft_train.jsonl")));
  auto pref = lines(read_file(d.file("preference_train.jsonl")));
  auto rl = lines(read_file(d.file("rl_train.jsonl")));
  ASSERT_EQ(sft.size(), 205u);
  ASSERT_EQ(pref.size(), sft.size());
  ASSERT_EQ(rl.size(), sft.size());
  for (size_t i = 0; i < sft.size(); ++i) {
    auto s = json::parse(sft[i], "sft_train.jsonl:" + std::to_string(i + 1));
    ASSERT_EQ(s["messages"].Size(), 2u);
    EXPECT_STREQ(s["messages"][0]["role"].GetString(), "user");
    EXPECT_STREQ(s["messages"][1]["role"].GetString(), "assistant");
    std::string q = s["messages"][0]["content"].GetString();
    std::string a = s["messages"][1]["content"].GetString();
    auto p = json::parse(pref[i], "preference_train.jsonl");
    auto r = json::parse(rl[i], "rl_train.jsonl");
    // The three files list the same problems in the same order.
    EXPECT_EQ(q, p["prompt"][0]["content"].GetString());
    EXPECT_EQ(q, r["prompt"][0]["content"].GetString());
    EXPECT_STREQ(p["prompt"][0]["role"].GetString(), "user");
    EXPECT_EQ(a, p["chosen"][0]["content"].GetString());
    EXPECT_STREQ(p["chosen"][0]["role"].GetString(), "assistant");
    std::string answer = r["answer"].GetString();
    std::string rejected = p["rejected"][0]["content"].GetString();
    // Recompute the answer from the question text itself.
    long long x, y;
    char op;
    ASSERT_EQ(std::sscanf(q.c_str(), "What is %lld %c %lld?", &x, &op, &y), 3) << q;
    long long want = op == '+' ? x + y : op == '-' ? x - y : x * y;
    EXPECT_EQ(answer, std::to_string(want)) << q;
    EXPECT_EQ(a, "The answer is " + answer + ".");
    EXPECT_EQ(reward::verify_math(a, answer), 1.0) << a;
    EXPECT_EQ(reward::verify_format_answer(a, answer), 1.0) << a;
    EXPECT_EQ(reward::verify_format_answer(rejected, answer), 1.0) << rejected;
    EXPECT_EQ(reward::verify_math(rejected, answer), 0.0) << q << " rejected: " << rejected;
  }
  auto m = json::parse(read_file(d.file("manifest.json")), "manifest.json");
  EXPECT_EQ(m["eval"].GetInt(), 50);
  EXPECT_STREQ(m["ops"].GetString(), "+-*");
}

TEST(Arithmetic, WrongAnswersArePlausible) {
  int near = 0, total = 0;
  for (int64_t a = 0; a < 100; a += 7)
    for (int64_t b = 0; b < 100; b += 3)
      for (char op : {'+', '-', '*'}) {
        if (op == '-' && b > a) continue;
        ArithmeticProblem p{a, b, op};
        for (uint64_t salt : {0ull, 1ull, 99ull}) {
          int64_t w = arithmetic_wrong_answer(p, salt);
          EXPECT_NE(w, p.answer()) << p.question();
          EXPECT_GE(w, 0) << p.question();
          EXPECT_EQ(w, arithmetic_wrong_answer(p, salt));  // deterministic
          near += std::llabs(w - p.answer()) <= std::max<int64_t>(10, p.answer() / 2);
          ++total;
        }
      }
  EXPECT_GT(near, total * 7 / 10);  // mostly close to the right answer, as a slip would be
}

TEST(Arithmetic, OptionErrorsNameTheFlagAndTheFix) {
  auto error_of = [](ArithmeticOptions o) -> std::string {
    try {
      arithmetic_splits(o);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  ArithmeticOptions bad;
  bad.digits = 0;
  bad.ops = "+/";
  bad.eval = 0;
  std::string e = error_of(bad);
  EXPECT_NE(e.find("--digits 0"), std::string::npos) << e;
  EXPECT_NE(e.find("`/` is not one of"), std::string::npos) << e;  // all errors reported together
  EXPECT_NE(e.find("--eval 0"), std::string::npos) << e;
  ArithmeticOptions odd;
  odd.operands = "wide";
  e = error_of(odd);
  EXPECT_NE(e.find("--operands `wide`: must be padded or plain"), std::string::npos) << e;
  ArithmeticOptions too_many;
  too_many.digits = 1;
  too_many.ops = "+-*";
  too_many.eval = 50;
  too_many.train = 300;
  e = error_of(too_many);
  EXPECT_NE(e.find("only 255 distinct problems"), std::string::npos) << e;
  EXPECT_NE(e.find("HINT"), std::string::npos) << e;
  ArithmeticOptions huge;
  huge.digits = 4;
  e = error_of(huge);
  EXPECT_NE(e.find("pass --train N"), std::string::npos) << e;
}

}  // namespace
}  // namespace ptk::tasks
