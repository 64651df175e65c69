// What the DPO stage tests share (dpo_stage_test, dpo_lora_test): a temp folder with the byte
// tokenizer, a random-init "SFT final" HF folder and 12 preference pairs of different lengths (9
// train, 3 eval; plain text, so the prompt/reply split is exact). Test code only.
#pragma once
#include <string>

#include "core/checkpoint/checkpoint.h"
#include "core/model/qwen2.h"
#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_qwen2.h"

namespace ptk::rl::test_support {

struct SftFolderAndPairs {
  test::TempDir dir;
  std::string model_dir, train_file, eval_file;
  SftFolderAndPairs() {
    model_dir = dir.file("sft-final");
    make_dirs(model_dir);
    tasks::write_byte_tokenizer(model_dir);
    auto m = model::Qwen2Model::from_config(test::tiny_byte_qwen2_config(), 7);
    checkpoint::SaveOptions so;
    so.source_dir = model_dir;
    m.save_pretrained(model_dir, so);
    std::string train, eval;
    for (int i = 0; i < 12; ++i) {
      int a = 3 + 7 * i, b = 11 + 5 * i;
      std::string line = "{\"prompt\": \"What is " + std::to_string(a) + " + " + std::to_string(b) +
                         "? \", \"chosen\": \"" + std::to_string(a + b) + (i % 3 ? "." : ", surely.") +
                         "\", \"rejected\": \"" + std::to_string(a + b + 10 * (1 + i % 4)) + "\"}\n";
      (i < 9 ? train : eval) += line;
    }
    train_file = dir.write("train.jsonl", train);
    eval_file = dir.write("eval.jsonl", eval);
  }
};

}  // namespace ptk::rl::test_support
