// `ptk make-data arithmetic`: writes the demo task (SFT, preference and RL splits) and, on request, a
// byte-level tokenizer for the tiny demo model. Not a converter for other datasets (see `ptk prepare`).
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "apps/ptk/cli.h"
#include "core/util/error.h"
#include "datasets/arithmetic.h"
#include "datasets/byte_tokenizer.h"

namespace po = boost::program_options;

namespace ptk::app {

int cmd_make_data(int argc, char** argv) {
  tasks::ArithmeticOptions opt;  // the defaults, documented once there
  cli::CommandLine cl(
      "make-data",
      "ptk make-data arithmetic --out DIR [--seed S] [--train N] [--eval M] [--digits D] [--ops +-*] "
      "[--operands padded|plain] [--tokenizer bytes]",
      "Generates the arithmetic demo task: \"What is 07 * 08?\" -> \"The answer is 56.\" in chat form.\n"
      "Writes DIR/{sft,preference,rl}_{train,eval}.jsonl (docs/DESIGN.md's formats; preference pairs reject a\n"
      "plausible wrong answer, RL prompts carry \"answer\") and DIR/manifest.json. Train and eval are disjoint\n"
      "by problem; the same flags give the same bytes. Subtraction keeps a >= b (no negative answers).\n\n"
      "Default difficulty: two-digit addition with zero-padded operands (10,000 problems, 300 held out).\n"
      "The tiny SFT recipe's 2-layer hidden-128 byte-level model, 2000 steps of 32 (~3 min on one\n"
      "core), got 5% / 45% / 89% / 99.3% of the held-out ones after 500 / 1000 / 1500 / 2000 steps; with\n"
      "--operands plain (\"4 + 90\") 2.3% / 7.7% / 11.7% / 14.3%: it never found the units digits of\n"
      "operands of varying width.\n"
      "One-digit problems are memorised outright (nothing left for RL); --ops +-* is harder.");
  cl.flags().add_options()
      ("out", po::value<std::string>()->required(), "output folder (created)")
      ("seed", po::value<uint64_t>(&opt.seed)->default_value(opt.seed), "seed for the splits and wrong answers")
      ("train", po::value<int64_t>(&opt.train)->default_value(opt.train),
       "training problems; 0 = every problem not held out")
      ("eval", po::value<int64_t>(&opt.eval)->default_value(opt.eval),
       "held-out problems (fixed by seed, digits and ops; independent of --train)")
      ("digits", po::value<int>(&opt.digits)->default_value(opt.digits),
       "operands in [0, 10^D); 1..9")
      ("ops", po::value<std::string>(&opt.ops)->default_value(opt.ops),
       "operations, any of + - * (write --ops=-* when the value starts with '-')")
      ("operands", po::value<std::string>(&opt.operands)->default_value(opt.operands),
       "`padded`: every operand written with D digits (\"04 + 90\"); `plain`: as numbers (\"4 + 90\")")
      ("tokenizer", po::value<std::string>()->default_value(""),
       "`bytes`: also write tokenizer.json + tokenizer_config.json (256 byte tokens + ChatML specials, "
       "vocab 259) for a tiny demo model");

  // The task name comes first: `ptk make-data arithmetic --out DIR`.
  std::vector<char*> args(argv, argv + argc);
  std::string task;
  if (argc >= 2 && argv[1][0] != '-') {
    task = argv[1];
    args.erase(args.begin() + 1);
  }
  if (!cl.parse(static_cast<int>(args.size()), args.data())) return 0;
  if (task != "arithmetic")
    throw UsageError("ptk make-data: " + (task.empty() ? std::string("no task named") : "unknown task `" + task + "`") +
                     "; the one task is `arithmetic`\n---> HINT: ptk make-data arithmetic --out DIR");
  std::string tok = cl.get<std::string>("tokenizer");
  if (!tok.empty() && tok != "bytes")
    throw UsageError("ptk make-data: --tokenizer `" + tok + "` is not known; the one choice is `bytes`");

  const std::string out = cl.get<std::string>("out");
  auto files = tasks::write_arithmetic_dataset(out, opt);
  std::vector<std::string> tok_files;
  if (tok == "bytes") tok_files = tasks::write_byte_tokenizer(out);

  auto splits = tasks::arithmetic_splits(opt);  // cheap; only for the example line below
  std::printf("arithmetic: digits %d (%s), ops %s, seed %llu: %lld train + %lld held-out problems (of %lld distinct)\n",
              opt.digits, opt.operands.c_str(), opt.ops.c_str(), static_cast<unsigned long long>(opt.seed),
              static_cast<long long>(splits.train.size()), static_cast<long long>(splits.eval.size()),
              static_cast<long long>(tasks::arithmetic_problem_count(opt.digits, opt.ops)));
  for (const auto& f : files) {
    if (f.lines > 0) {
      std::printf("  %-48s %lld lines\n", f.path.c_str(), static_cast<long long>(f.lines));
    } else {
      std::printf("  %s\n", f.path.c_str());
    }
  }
  for (const auto& f : tok_files)
    std::printf("  %-48s byte-level, vocab %d\n", f.c_str(), tasks::kByteTokenizerVocabSize);
  const auto& e = splits.train.front();
  std::printf("example: %s -> %s\n", e.question().c_str(), e.answer_text().c_str());
  return 0;
}

}  // namespace ptk::app
