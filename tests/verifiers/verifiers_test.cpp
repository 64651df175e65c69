// Rule verifiers: every documented case of extraction, numeric equivalence, normalisation, each
// verifier and the registry. The real GSM8K/MATH-500 answers are in verifiers_data_test.cpp.
#include <gtest/gtest.h>

#include "core/util/error.h"
#include "reward/verifiers.h"

namespace ptk::reward {
namespace {

std::string extracted(std::string_view r) { return extract_final_answer(r).value_or("<none>"); }

TEST(Extract, Gsm8kHashesWinAndTakeTheLine) {
  EXPECT_EQ(extracted("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"), "18");
  EXPECT_EQ(extracted("x\n#### 1,000\nextra 7"), "1,000");
  EXPECT_EQ(extracted("\\boxed{3} but #### 4"), "4");  // #### outranks \boxed
}

TEST(Extract, BoxedKeepsNestedBracesAndTakesTheLast) {
  EXPECT_EQ(extracted("so $\\boxed{\\frac{1}{2}}$."), "\\frac{1}{2}");
  EXPECT_EQ(extracted("\\boxed{1} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}"), "\\left( 3, \\frac{\\pi}{2} \\right)");
  EXPECT_EQ(extracted("\\boxed{\\{1,2\\}}"), "\\{1,2\\}");  // escaped braces do not count
  EXPECT_EQ(extracted("\\fbox{7}"), "7");
  EXPECT_EQ(extracted("$\\boxed 5$"), "5");
  EXPECT_EQ(extracted("The answer is 9 \\boxed{8}"), "8");  // \boxed outranks "answer is"
}

TEST(Extract, AnswerIsTakesALeadingNumberOrTheLine) {
  EXPECT_EQ(extracted("37 + 45 = 82. The answer is 82."), "82");
  EXPECT_EQ(extracted("The answer is 3.5."), "3.5");
  EXPECT_EQ(extracted("The answer is -1,234. Done with 7 steps"), "-1,234");
  EXPECT_EQ(extracted("the final answer is: $12"), "$12");
  EXPECT_EQ(extracted("The answer is $\\frac{3}{4}$."), "\\frac{3}{4}");
  EXPECT_EQ(extracted("The answer is 2x+1.\nnext line 5"), "2x+1");
  EXPECT_EQ(extracted("The answer is 50%."), "50%");
}

TEST(Extract, LastNumberAsFallback) {
  EXPECT_EQ(extracted("I think 3 apples and then 12 pears"), "12");
  EXPECT_EQ(extracted("costs -$5 total"), "-$5");
  EXPECT_EQ(extracted("ratio 3/4"), "3/4");
  EXPECT_EQ(extracted("list 1,2,3"), "3");  // not a thousands group
  EXPECT_EQ(extracted("x2 and 5"), "5");    // a digit glued to a word is not a number start
  EXPECT_FALSE(extract_final_answer("no numbers here").has_value());
}

TEST(Number, ParsesTheWaysAnswersAreWritten) {
  EXPECT_DOUBLE_EQ(*parse_number("1,000"), 1000);
  EXPECT_DOUBLE_EQ(*parse_number("1000.0"), 1000);
  EXPECT_DOUBLE_EQ(*parse_number("-1,234,567.5"), -1234567.5);
  EXPECT_DOUBLE_EQ(*parse_number(" $18 "), 18);
  EXPECT_DOUBLE_EQ(*parse_number("\\$18"), 18);
  EXPECT_DOUBLE_EQ(*parse_number("50%"), 50);
  EXPECT_DOUBLE_EQ(*parse_number("10\\%"), 10);
  EXPECT_DOUBLE_EQ(*parse_number("3/4"), 0.75);
  EXPECT_DOUBLE_EQ(*parse_number("-3/4"), -0.75);
  EXPECT_DOUBLE_EQ(*parse_number("\\frac{3}{4}"), 0.75);
  EXPECT_DOUBLE_EQ(*parse_number("-\\dfrac{1}{8}"), -0.125);
  EXPECT_DOUBLE_EQ(*parse_number("\\frac34"), 0.75);
  EXPECT_DOUBLE_EQ(*parse_number("$-5$"), -5);
  EXPECT_DOUBLE_EQ(*parse_number(".5"), 0.5);
  EXPECT_DOUBLE_EQ(*parse_number("42."), 42);
  EXPECT_DOUBLE_EQ(*parse_number("1{,}000"), 1000);
  for (const char* bad : {"", "1,00", "1,-2", "3, 5, 7", "x", "1/0", "\\frac{\\pi}{2}", "2x", "1.2.3", "12,3456", "--5"})
    EXPECT_FALSE(parse_number(bad).has_value()) << bad;
}

TEST(Normalize, StripsLatexNoise) {
  EXPECT_EQ(normalize_answer("\\left( 3, \\frac{\\pi}{2} \\right)"), "(3,\\frac{\\pi}{2})");
  EXPECT_EQ(normalize_answer("\\dfrac{\\sqrt{3}}{2}"), "\\frac{\\sqrt{3}}{2}");
  EXPECT_EQ(normalize_answer("90^\\circ"), "90");
  EXPECT_EQ(normalize_answer("\\text{Evelyn}"), "Evelyn");
  EXPECT_EQ(normalize_answer("x = 5"), "5");
  EXPECT_EQ(normalize_answer("$p - q$."), "p-q");
  EXPECT_EQ(normalize_answer("\\leftarrow"), "\\leftarrow");  // \left only as a whole command
}

TEST(Equivalent, ByValueOrNormalisedText) {
  EXPECT_TRUE(answers_equivalent("1,000", "1000"));
  EXPECT_TRUE(answers_equivalent("1000.0", "1,000"));
  EXPECT_TRUE(answers_equivalent("3/4", "0.75"));
  EXPECT_TRUE(answers_equivalent("\\frac{3}{4}", "0.75"));
  EXPECT_TRUE(answers_equivalent("-7", "-7.00"));
  EXPECT_TRUE(answers_equivalent("$5", "5"));
  EXPECT_TRUE(answers_equivalent("25%", "25"));
  EXPECT_TRUE(answers_equivalent("90^\\circ", "90"));
  EXPECT_TRUE(answers_equivalent("x=5", "5"));
  EXPECT_TRUE(answers_equivalent("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"));
  EXPECT_FALSE(answers_equivalent("7", "-7"));
  EXPECT_FALSE(answers_equivalent("1,000", "100"));
  EXPECT_FALSE(answers_equivalent("0.333", "1/3"));
  EXPECT_FALSE(answers_equivalent("(-2,1)", "[-2,1)"));
  EXPECT_FALSE(answers_equivalent("", ""));
}

TEST(Verifiers, Math) {
  EXPECT_EQ(verify_math("The answer is 1,000.", "1000"), 1.0);
  EXPECT_EQ(verify_math("... so \\boxed{\\frac{3}{4}}", "0.75"), 1.0);
  EXPECT_EQ(verify_math("Natalia sold 48/2 = 24 clips.\n#### 72", "72"), 1.0);
  EXPECT_EQ(verify_math("answer: 72", "Natalia sold 48/2 = 24 clips.\n#### 72"), 1.0);  // GSM8K label
  EXPECT_EQ(verify_math("The answer is -3.", "-3"), 1.0);
  EXPECT_EQ(verify_math("The answer is 3.", "-3"), 0.0);
  EXPECT_EQ(verify_math("The answer is 82.", "81"), 0.0);
  EXPECT_EQ(verify_math("no idea", "5"), 0.0);
  EXPECT_EQ(verify_math("The answer is 5.", ""), 0.0);
  EXPECT_EQ(verify_math("so $\\boxed{p - q}$", "p-q"), 1.0);
}

TEST(Verifiers, Exact) {
  EXPECT_EQ(verify_exact("  hello \n  world ", "hello world"), 1.0);
  EXPECT_EQ(verify_exact("Hello world", "hello world"), 0.0);
  EXPECT_EQ(verify_exact("hello world.", "hello world"), 0.0);
}

TEST(Verifiers, FormatThink) {
  EXPECT_EQ(verify_format_think("<think>add them</think>\n<answer>82</answer>", ""), 1.0);
  EXPECT_EQ(verify_format_think("  <think>a</think><answer>b</answer>\n", ""), 1.0);
  EXPECT_EQ(verify_format_think("<answer>82</answer><think>x</think>", ""), 0.0);  // order
  EXPECT_EQ(verify_format_think("<think> </think><answer>82</answer>", ""), 0.0);  // blank body
  EXPECT_EQ(verify_format_think("<think>a</think>junk<answer>b</answer>", ""), 0.0);
  EXPECT_EQ(verify_format_think("<think>a</think><answer>b</answer> trailing", ""), 0.0);
  EXPECT_EQ(verify_format_think("<think>a<think>b</think><answer>c</answer>", ""), 0.0);  // tag twice
  EXPECT_EQ(verify_format_think("82", ""), 0.0);
}

TEST(Verifiers, FormatAnswer) {
  EXPECT_EQ(verify_format_answer("The answer is 82.", ""), 1.0);
  EXPECT_EQ(verify_format_answer("37 + 45 = 82. The answer is 82.\n", ""), 1.0);
  EXPECT_EQ(verify_format_answer("The answer is -1,234.", ""), 1.0);
  EXPECT_EQ(verify_format_answer("The answer is 82", ""), 0.0);    // no period
  EXPECT_EQ(verify_format_answer("The answer is 82. ok", ""), 0.0);  // not the end
  EXPECT_EQ(verify_format_answer("The answer is eighty.", ""), 0.0);
  EXPECT_EQ(verify_format_answer("The answer is  82.", ""), 0.0);
  EXPECT_EQ(verify_format_answer("XThe answer is 82.", ""), 0.0);
  EXPECT_EQ(verify_format_answer("the answer is 82.", ""), 0.0);  // exact wording
}

TEST(Registry, ClosedSetByName) {
  EXPECT_EQ(verifier_names(), "math, exact, format_think, format_answer");
  EXPECT_EQ(find_verifier("math").fn("The answer is 4.", "4"), 1.0);
  EXPECT_EQ(find_verifier("format_answer").fn("The answer is 4.", ""), 1.0);
  for (const auto& v : verifiers()) {
    double r = v.fn("<think>x</think><answer>The answer is 4.</answer>", "4");
    EXPECT_TRUE(r >= 0.0 && r <= 1.0) << v.name;
  }
  try {
    find_verifier("maths");
    FAIL() << "expected ptk::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("unknown verifier `maths`"), std::string::npos) << m;
    EXPECT_NE(m.find("did you mean `math`"), std::string::npos) << m;
    EXPECT_NE(m.find("format_answer"), std::string::npos) << m;
  }
}

}  // namespace
}  // namespace ptk::reward
