// `run.device=cuda` (the training stages, the reward server's recipe) and `--device cuda` (generate,
// forward, eval, reward-server) on a machine without a GPU: the command exits non-zero with the
// error naming the key and a hint, before it prepares data or makes a run folder. Skipped where a
// GPU is present (there the same commands run on it). Not the device placement itself
// (tests/stages/meta_step_test, tests/runtime/device_test).
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <string>

#include "core/util/fs.h"
#include "datasets/byte_tokenizer.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

void expect_refused(const test::RunResult& r, const std::string& key, const std::string& what) {
  EXPECT_NE(r.exit_code, 0) << what << "\n" << r.out;
  EXPECT_NE(r.out.find(key + " = cuda but this machine has no CUDA GPU"), std::string::npos) << what << "\n" << r.out;
  EXPECT_NE(r.out.find("HINT: " + key + "=cpu, or auto"), std::string::npos) << what << "\n" << r.out;
}

TEST(DeviceCli, CudaWithoutAGpuIsRefusedByEveryCommand) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "this machine has a GPU: run.device=cuda is not an error here";
  test::TempDir d;
  tasks::write_byte_tokenizer(d.file("tok"));
  d.write("model.json", test::kTinyByteModelJson);
  const std::string sft = d.write("sft.jsonl", "{\"prompt\": \"1 + 1 =\", \"completion\": \" 2\"}\n");
  const std::string pairs = d.write("pairs.jsonl", "{\"prompt\": \"1 + 1 =\", \"chosen\": \" 2\", \"rejected\": \" 3\"}\n");
  const std::string prompts = d.write("prompts.jsonl", "{\"prompt\": \"1 + 1 =\", \"answer\": \"2\"}\n");
  const std::string common = " model.config=" + d.file("model.json") + " tokenizer.path=" + d.file("tok") +
                             " run.device=cuda data.max_seq_len=32";
  const std::string bin = test::ptk_binary();
  const std::vector<std::vector<std::string>> stages{{"sft", sft, ""},
                                                     {"dpo", pairs, ""},
                                                     {"rm", pairs, ""},
                                                     {"grpo", prompts, " train.micro_batch_size=4 grpo.num_generations=4"}};
  for (const auto& s : stages) {
    const std::string& stage = s[0];
    const std::string run = d.file("run-" + stage);
    auto r = test::run(bin + " " + stage + common + s[2] + " run.dir=" + run + " 'data.train=[\"" + s[1] + "\"]' 2>&1");
    expect_refused(r, "run.device", "ptk " + stage);
    EXPECT_FALSE(path_exists(run)) << "ptk " << stage << " made its run folder before refusing the device";
  }
  const std::string missing = d.file("no-such-model");
  expect_refused(test::run(bin + " forward --model " + missing + " --input in.json --output out.safetensors --device cuda 2>&1"),
                 "--device", "ptk forward");
  expect_refused(test::run(bin + " generate --model " + missing + " --input in.jsonl --output out.jsonl --device cuda 2>&1"),
                 "--device", "ptk generate");
  expect_refused(test::run(bin + " eval --model " + missing + " --data " + prompts + " --device cuda 2>&1"), "--device",
                 "ptk eval");
  const std::string server = d.write("server.json", "{\"reward\": {\"verifiers\": [\"math\"]}}\n");
  expect_refused(test::run(bin + " reward-server --recipe " + server + " --device cuda --check 2>&1"), "--device",
                 "ptk reward-server --device");
  expect_refused(test::run(bin + " reward-server --recipe " + server + " run.device=cuda --check 2>&1"), "run.device",
                 "ptk reward-server run.device");
}

}  // namespace
}  // namespace ptk
