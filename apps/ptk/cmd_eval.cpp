// `ptk eval --model DIR --data prompts.jsonl [--verifier NAME]`: held-out accuracy of a model
// (eval/eval.h): a table on the terminal and a JSON file. Not a benchmark of speed.
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "apps/ptk/cli.h"
#include "core/checkpoint/model_folder.h"
#include "core/model/qwen2.h"
#include "core/runtime/device.h"
#include "core/runtime/runtime.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "reward/verifiers.h"
#include "eval/eval.h"

namespace po = boost::program_options;

namespace ptk::app {

// Where `ptk eval` writes without --output: never into the model folder (an HF folder that is
// copied, uploaded or loaded elsewhere). A run's final/ or checkpoints/step-N writes into that run
// folder's eval/ (<run>/eval/final-<data>.json); any other folder into runs/eval/<folder>-<data>.json.
std::string default_eval_output(const std::string& model_dir, const std::string& data) {
  namespace fs = std::filesystem;
  fs::path m = fs::path(model_dir).lexically_normal();
  if (m.filename().empty()) m = m.parent_path();  // "final/"
  const std::string name = m.filename().string(), stem = fs::path(data).stem().string();
  const fs::path parent = m.parent_path();
  auto is_run = [](const fs::path& run) {
    return !run.empty() && (path_exists((run / "config.json").string()) || path_exists((run / "metrics.jsonl").string()) ||
                            path_exists((run / "checkpoints").string()));
  };
  if (name == "final" && is_run(parent)) return (parent / "eval" / ("final-" + stem + ".json")).string();
  if (name.rfind("step-", 0) == 0 && parent.filename() == "checkpoints" && is_run(parent.parent_path()))
    return (parent.parent_path() / "eval" / (name + "-" + stem + ".json")).string();
  return (fs::path("runs") / "eval" / ((name.empty() ? std::string("model") : name) + "-" + stem + ".json")).string();
}

int cmd_eval(int argc, char** argv) {
  cli::CommandLine cl("eval",
                      "ptk eval --model DIR --data prompts.jsonl [--verifier NAME] [--max-new-tokens N] "
                      "[--temperature T] [--samples G] [--limit N] [--reward-model DIR] [--output FILE]",
                      "Generates completions for held-out RL-format prompts ({\"prompt\": ..., \"answer\": ...};\n"
                      "message lists are rendered with the generation prompt) through the rollout engine and\n"
                      "checks them with a rule verifier. Greedy unless --temperature > 0. Verifiers: " +
                          reward::verifier_names() + ".\n"
                      "Results go to --output FILE; by default beside the run, never into the model folder:\n"
                      "<run>/eval/final-<data>.json for a run's final/ (step-N-<data>.json for checkpoints/step-N),\n"
                      "else runs/eval/<model folder name>-<data>.json.");
  cl.flags().add_options()("model", po::value<std::string>()->required(), "HF model folder (with tokenizer files)")(
      "data", po::value<std::string>()->required(), "RL-format JSONL with `prompt` and `answer`")(
      "verifier", po::value<std::string>()->default_value("math"), "answer checker (see above)")(
      "tokenizer", po::value<std::string>()->default_value(""), "tokenizer folder or file; default --model")(
      "max-new-tokens", po::value<int64_t>()->default_value(128), "generation budget per sample")(
      "temperature", po::value<double>()->default_value(0.0), "0 = greedy")(
      "top-p", po::value<double>()->default_value(1.0), "nucleus sampling mass")(
      "top-k", po::value<int64_t>()->default_value(0), "0 = off")(
      "samples", po::value<int64_t>()->default_value(1), "samples per prompt (accuracy averages them)")(
      "seed", po::value<uint64_t>()->default_value(0), "sampling seed")(
      "limit", po::value<int64_t>()->default_value(0), "first N prompts only; 0 = all")(
      "slots", po::value<int64_t>()->default_value(64), "sequences decoded together")(
      "reward-model", po::value<std::string>()->default_value(""),
      "a Qwen2ForSequenceClassification folder: also report the mean reward")(
      "output", po::value<std::string>()->default_value(""), "JSON results file; default <run>/eval/final-<data>.json (see above)")(
      "device", po::value<std::string>()->default_value("auto"),
      "where the models run: auto (a GPU when there is one, else the CPU) | cpu | cuda | cuda:N");
  cl.accept_chat_template();
  if (!cl.parse(argc, argv)) return 0;
  runtime::init_and_announce(cl.threads());
  std::string model_dir = cl.get<std::string>("model"), data = cl.get<std::string>("data");
  std::string tok_path = cl.get<std::string>("tokenizer").empty() ? model_dir : cl.get<std::string>("tokenizer");
  eval::EvalOptions o;
  o.verifier = cl.get<std::string>("verifier");
  reward::find_verifier(o.verifier);  // fails early on a typo
  o.max_new_tokens = cl.get<int64_t>("max-new-tokens");
  o.sampling = {cl.get<double>("temperature"), cl.get<double>("top-p"), cl.get<int64_t>("top-k")};
  o.samples = cl.get<int64_t>("samples");
  o.seed = cl.get<uint64_t>("seed");
  o.slots = cl.get<int64_t>("slots");
  if (o.samples < 1 || o.max_new_tokens < 1 || o.slots < 1)
    throw UsageError("ptk eval: --samples, --max-new-tokens and --slots must be >= 1");
  model::LoadOptions lo;
  lo.device = runtime::resolve_device(cl.get<std::string>("device"), "--device");
  // The folders first (a wrong --model is named as such, not as a tokenizer problem), then the
  // tokenizer against each model's embedding, as the training stages check it.
  checkpoint::require_model_folder(model_dir, "--model");
  const std::string rm_dir = cl.get<std::string>("reward-model");
  if (!rm_dir.empty()) checkpoint::require_model_folder(rm_dir, "--reward-model");
  auto tok = tokenizer::Tokenizer::load(tok_path, tokenizer::chat_load_options(cl.chat_template(), cl.chat_template_kwargs()));
  auto model = model::Qwen2Model::from_pretrained(model_dir, lo);
  checkpoint::check_tokenizer_fits(static_cast<int64_t>(tok.vocab_size()), tok_path, model.config().vocab_size, model_dir);
  model::Qwen2Model rm;
  if (!rm_dir.empty()) {
    rm = model::Qwen2Model::from_pretrained(rm_dir, lo);
    if (!rm.has_score_head())
      throw Error(rm_dir + " has no score head (not a Qwen2ForSequenceClassification folder)");
    checkpoint::check_tokenizer_fits(static_cast<int64_t>(tok.vocab_size()), tok_path, rm.config().vocab_size, rm_dir);
    o.reward_model = &rm;
  }
  auto prompts = eval::read_eval_prompts(data, tok, cl.get<int64_t>("limit"));
  std::fprintf(stderr, "eval: %zu prompts x %lld samples from %s\n", prompts.size(), static_cast<long long>(o.samples),
               data.c_str());
  auto r = eval::evaluate(model, tok, prompts, o);
  std::string out = cl.get<std::string>("output").empty() ? default_eval_output(model_dir, data) : cl.get<std::string>("output");
  if (!parent_dir(out).empty()) make_dirs(parent_dir(out));
  write_file_atomic(out, eval::result_json(r, model_dir, data, o));
  std::printf("| model | data | verifier | prompts | samples | accuracy | mean length | %s time |\n",
              r.has_reward ? "mean reward |" : "");
  std::printf("| --- | --- | --- | ---: | ---: | ---: | ---: | %s---: |\n", r.has_reward ? "---: | " : "");
  std::printf("| %s | %s | %s | %lld | %lld | %.4f (%.1f%%) | %.1f tokens | ", model_dir.c_str(), data.c_str(),
              o.verifier.c_str(), static_cast<long long>(r.prompts), static_cast<long long>(r.samples), r.accuracy,
              100 * r.accuracy, r.mean_length);
  if (r.has_reward) std::printf("%.4f | ", r.mean_reward);
  std::printf("%.1f s (%.0f tokens/s) |\nwrote %s\n", r.seconds, r.tokens_per_s, out.c_str());
  return 0;
}

}  // namespace ptk::app
