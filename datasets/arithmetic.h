// The arithmetic demo task: "What is 37 + 45?" -> "The answer is 82.", in chat form, as SFT
// conversations, preference pairs and RL prompts with disjoint train/held-out splits, deterministic
// for a seed. Not a general dataset library (JSONL readers and `prepare` live beside it in datasets/).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ptk::tasks {

// Defaults chosen from a spike: a 2-layer hidden-128 byte-level GPT (this task's chat format, loss on
// the answer only, AdamW 3e-3, batch 32) trained 150 s on one CPU thread of a busy machine, then
// greedy decoding on the held-out problems:
//   digits 1, ops +-*   510 steps, loss 0.003, 20/51 right — the 204 training facts are memorised,
//                       so DPO and GRPO on training prompts would have nothing left to learn
//   digits 2, ops +     459 steps, loss 0.15, 30/300 right — the carry rule is being learnt
//   digits 2, ops +-    265 steps, loss 0.25, 5/300 right
//   digits 2, ops +-*   138 steps, loss 0.33, 1/300 right (the figure: 4/300 after 434 steps)
// (the last two got fewer steps because builds shared the CPU: read them as "slower", not as a
// controlled comparison). Every setting learnt the "The answer is N." format completely.
// Default: two-digit addition — held-out accuracy should move visibly in the ~3-minute demo (2
// cores, C++), yet training prompts are not all solved after SFT, so preference pairs and GRPO
// rewards still carry signal. Raise --digits or add ops for harder runs.
// Reproduce: python3 scripts/spikes/arithmetic_difficulty.py DIGITS OPS SECONDS (needs PyTorch).
struct ArithmeticOptions {
  uint64_t seed = 0;
  int64_t train = 0;       // 0: every problem not held out (9,700 with the defaults)
  int64_t eval = 300;      // held-out problems (the first `eval` of the seeded order)
  int digits = 2;          // operands in [0, 10^digits); 1..9
  std::string ops = "+";   // any of + - *; subtraction keeps a >= b, so answers are never negative
  // "padded": operands written with exactly `digits` digits ("What is 04 + 90?"); "plain": as numbers
  // ("What is 4 + 90?"). Measured 2026-11-28 with the tiny SFT recipe's model (2-layer, hidden 128,
  // byte tokens), 2000 steps of 32, weight decay 0.01, 1 thread, held-out greedy accuracy at steps
  // 500 / 1000 / 1500 / 2000: padded 5% / 45% / 89% / 99.3%, plain 2.3% / 7.7% / 11.7% / 14.3%. With
  // operands of varying width the model located their digits only roughly: it got the sum to within
  // ~3, its units digit at chance. Answers are never padded.
  std::string operands = "padded";
};

struct ArithmeticProblem {
  int64_t a = 0, b = 0;
  char op = '+';
  int width = 0;                    // operands zero-padded to this many digits; 0 = not padded
  int64_t answer() const;
  std::string question() const;     // "What is 37 + 45?" ("What is 04 + 90?" with width 2)
  std::string answer_text() const;  // "The answer is 82."
};

struct ArithmeticSplits {
  std::vector<ArithmeticProblem> train, eval;  // disjoint by (a, op, b)
};

// Number of distinct problems for `digits` and `ops`.
int64_t arithmetic_problem_count(int digits, const std::string& ops);

// Checks the options (collecting every error) and draws the splits. The held-out set depends only
// on seed, digits, ops and eval — not on `train` — so runs with different train sizes share it.
// Throws ptk::Error naming the flag and the fix.
ArithmeticSplits arithmetic_splits(const ArithmeticOptions& opt);

// A plausible wrong answer (off by one, off by ten, a dropped carry, a swapped digit, an operand
// added or left out), never the right one and never negative; deterministic in (problem, salt).
int64_t arithmetic_wrong_answer(const ArithmeticProblem& p, uint64_t salt);

// JSONL text, one line per problem, in docs/DESIGN.md's formats (TRL's conversational form):
//   sft:        {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "The answer is 82."}]}
//   preference: {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}
//   rl:         {"prompt": [user message], "answer": "82"}
std::string arithmetic_sft_jsonl(const std::vector<ArithmeticProblem>& problems);
std::string arithmetic_preference_jsonl(const std::vector<ArithmeticProblem>& problems, uint64_t seed);
std::string arithmetic_rl_jsonl(const std::vector<ArithmeticProblem>& problems);

struct WrittenFile {
  std::string path;
  int64_t lines = 0;
};

// Writes {sft,preference,rl}_{train,eval}.jsonl and manifest.json (the options) into `out_dir`
// (created), each file atomically. Returns what it wrote, in order.
std::vector<WrittenFile> write_arithmetic_dataset(const std::string& out_dir, const ArithmeticOptions& opt);

}  // namespace ptk::tasks
