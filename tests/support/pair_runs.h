// What the DPO and reward-model invariant tests (tests/dpo/dpo_invariants_test.cpp,
// tests/reward/rm_invariants_test.cpp) train from: a starting model, 16 + 4 hand-written preference
// pairs and a recipe, through the ptk binary. Test code only.
#pragma once
#include <string>

#include "core/checkpoint/checkpoint.h"
#include "core/model/qwen2.h"
#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::test {

// Writes into `d`:
// - start/: a random-init HF folder (the tiny byte Qwen2, seed 7) with the byte tokenizer.
//   initializer_range 0.1 puts logits far from uniform, so that rewards, margins and scores differ
//   from pair to pair well beyond fp32 noise (accuracies are not ties);
// - train.jsonl, 16 pairs (4 whole steps of 4 pairs an epoch), and eval.jsonl, 4 pairs, replies of
//   different lengths so that micro-batches pad differently; with `margins`, each pair also has a
//   "margin" (the reward model's).
inline void write_pair_inputs(const TempDir& d, bool margins) {
  std::string model = d.file("start");
  make_dirs(model);
  tasks::write_byte_tokenizer(model);
  auto c = tiny_byte_qwen2_config();
  c.initializer_range = 0.1;
  checkpoint::SaveOptions so;
  so.source_dir = model;  // keep the tokenizer files (save_pretrained swaps a new folder in)
  model::Qwen2Model::from_config(c, 7).save_pretrained(model, so);
  std::string train, eval;
  for (int i = 0; i < 20; ++i) {
    int a = 3 + 7 * i, b = 11 + 5 * i;
    std::string line = "{\"prompt\": \"What is " + std::to_string(a) + " + " + std::to_string(b) +
                       "? \", \"chosen\": \"" + std::to_string(a + b) + (i % 3 ? "." : ", surely.") +
                       "\", \"rejected\": \"" + std::to_string(a + b + 10 * (1 + i % 4)) + (i % 2 ? "" : " I think") +
                       "\"" + (margins ? ", \"margin\": " + std::to_string(0.25 * (i % 5)) : "") + "}\n";
    (i < 16 ? train : eval) += line;
  }
  d.write("train.jsonl", train);
  d.write("eval.jsonl", eval);
}

// A recipe over write_pair_inputs' files: start/ as the model, max_seq_len 64, lr 3e-3 without
// warmup, no periodic checkpoints, run.seed `seed`, and the stage's own section (e.g.
// `"dpo": {"beta": 0.1}`). The tests override the rest per run.
inline std::string pair_recipe(const TempDir& d, int seed, const std::string& stage_section) {
  return "{\"model\": {\"path\": \"" + d.file("start") + "\"},\n"
         " \"run\": {\"seed\": " + std::to_string(seed) + "},\n"
         " \"data\": {\"train\": [\"" + d.file("train.jsonl") + "\"], \"eval\": [\"" + d.file("eval.jsonl") +
         "\"], \"max_seq_len\": 64},\n"
         " \"optim\": {\"lr\": 3e-3, \"warmup_steps\": 0},\n"
         " \"checkpoint\": {\"every\": 0},\n"
         " " + stage_section + "}\n";
}

}  // namespace ptk::test
