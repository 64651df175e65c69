// `ptk merge-lora --adapter DIR --output DIR [--model BASE] [--dtype auto|float32|bfloat16]`: a PEFT
// adapter folder (a ptk LoRA stage's final/ or checkpoint, or PEFT's save_pretrained) merged into its
// base and written as a plain Hugging Face folder (PEFT's merge_and_unload + save_pretrained).
// The merge itself is model::Lora::merge_into (W + s·B A in float32, fp32 adapters, one cast to the output dtype).
#include <torch/torch.h>

#include <filesystem>
#include <iostream>

#include "apps/ptk/cli.h"
#include "core/checkpoint/adapter_config.h"
#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/hf_config.h"
#include "core/checkpoint/model_folder.h"
#include "core/model/lora.h"
#include "core/model/qwen2.h"
#include "core/runtime/runtime.h"
#include "core/util/error.h"
#include "core/util/fs.h"

namespace ptk::app {
namespace {

namespace fs = std::filesystem;

std::string canonical_or_self(const std::string& p) {
  std::error_code ec;
  auto c = fs::weakly_canonical(p, ec);
  return ec ? p : c.string();
}

bool has_tokenizer(const std::string& dir) {
  return path_exists(dir + "/tokenizer.json") || path_exists(dir + "/tokenizer_config.json") ||
         path_exists(dir + "/vocab.json");
}

}  // namespace

int cmd_merge_lora(int argc, char** argv) {
  namespace po = boost::program_options;
  cli::CommandLine cl(
      "merge-lora", "ptk merge-lora --adapter DIR --output DIR [--model BASE] [--dtype auto|float32|bfloat16]",
      "Merges a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors: a LoRA stage's\n"
      "final/ or checkpoints/step-N, or PEFT's save_pretrained) into its base model and writes a plain\n"
      "Hugging Face folder: config.json, model.safetensors (sharded as save_pretrained does above 5 GB),\n"
      "generation_config.json (the base's) and the tokenizer files (the adapter folder's, else the base's).\n"
      "Each adapted weight becomes W + s * B A (computed in float32); modules_to_save (a reward model's score\n"
      "head) replace the base's. The base is adapter_config.json's base_model_name_or_path unless --model\n"
      "names another copy; a base that is itself an adapter folder is merged first. The output is written\n"
      "atomically (a temporary folder renamed into place). Every ptk command also takes the adapter folder\n"
      "itself as a model; merge-lora is for tools that do not (transformers, vLLM) and for faster loading.");
  cl.flags().add_options()("adapter", po::value<std::string>()->required(), "PEFT adapter folder to merge")(
      "output", po::value<std::string>()->required(), "folder to write the merged model to (replaced if it is one)")(
      "model", po::value<std::string>()->default_value(""),
      "base model folder (default: the adapter's base_model_name_or_path)")(
      "dtype", po::value<std::string>()->default_value("auto"),
      "dtype of the written weights: auto (the base's torch_dtype) | float32 | bfloat16");
  if (!cl.parse(argc, argv)) return 0;
  runtime::init_and_announce(cl.threads());
  const std::string adapter = cl.get<std::string>("adapter");
  std::string output = cl.get<std::string>("output");
  while (output.size() > 1 && output.back() == '/') output.pop_back();
  std::string base = cl.get<std::string>("model");
  const std::string dtype_name = cl.get<std::string>("dtype");
  if (dtype_name != "auto" && dtype_name != "float32" && dtype_name != "bfloat16")
    throw UsageError("ptk merge-lora: --dtype must be auto, float32 or bfloat16, not " + dtype_name);

  if (!checkpoint::is_adapter_folder(adapter)) {
    std::string hint = path_exists(adapter + "/config.json")
                           ? "it holds config.json: it is a model folder already, nothing to merge"
                           : "give the folder a LoRA stage wrote (run.dir/final with model.lora.enabled=true) or PEFT's "
                             "save_pretrained output";
    throw Error("--adapter " + adapter + " is not a PEFT adapter folder (no adapter_config.json)\n---> HINT: " + hint);
  }
  if (!path_exists(adapter + "/adapter_model.safetensors"))
    throw Error(adapter + "/adapter_model.safetensors: missing (the adapter folder holds adapter_config.json only)"
                "\n---> HINT: PEFT's older adapter_model.bin is not read; save the adapter with safe_serialization=True");
  // A missing base is refused there, with the hint to pass --model.
  if (base.empty()) base = checkpoint::adapter_base_dir(adapter);
  checkpoint::require_model_folder(base, "--model");
  const std::string out_c = canonical_or_self(output);
  // Every folder the merge reads: the adapter, its base and, when the base is an adapter folder, the
  // chain down to the model folder (replacing one would change the models built on it).
  std::vector<std::string> inputs{adapter};
  for (std::string d = base;; d = checkpoint::adapter_base_dir(d)) {
    inputs.push_back(d);
    if (!checkpoint::is_adapter_folder(d) || inputs.size() > 10) break;
  }
  for (const std::string& in : inputs)
    if (out_c == canonical_or_self(in))
      throw UsageError("ptk merge-lora: --output " + output + " is an input folder (" + in + "); give a new folder");
  if (checkpoint::is_adapter_folder(output))
    throw Error("--output " + output + " is an adapter folder\n---> HINT: give a new folder; merge-lora only replaces "
                "a model folder");
  if (path_exists(output) && !checkpoint::model_folder_problem(output).empty() && !fs::is_empty(output))
    throw Error("--output " + output + " exists and is not a model folder (" + checkpoint::model_folder_problem(output) +
                ")\n---> HINT: give a new folder; merge-lora only replaces a model folder");

  const checkpoint::Qwen2Config base_cfg = checkpoint::read_config(base);
  // The base at its stored dtype, the adapters in fp32 (as PEFT's merge_and_unload), W + s·BA in fp32,
  // then one cast to the output dtype: nothing is rounded twice.
  auto dtype_of = [](const std::string& n) {
    return n == "bfloat16" ? at::kBFloat16 : n == "float16" ? at::kHalf : at::kFloat;
  };
  model::LoadOptions lo;
  lo.dtype = dtype_of(base_cfg.torch_dtype);
  const at::ScalarType out_dtype = dtype_name == "auto" ? lo.dtype : dtype_of(dtype_name);
  std::cout << "merge-lora: base " << base << " (" << base_cfg.torch_dtype << "), adapter " << adapter << std::endl;

  model::Qwen2Model m = model::Qwen2Model::from_pretrained(base, lo);
  model::Qwen2Model merged;
  int64_t adapted = 0;
  {
    torch::NoGradGuard ng;
    model::Lora L = [&] {
      try {
        return model::Lora::load(m, adapter, at::kFloat);
      } catch (const Error& e) {
        throw Error("the adapter " + adapter + " does not fit the base " + base + ": " + e.what() +
                    "\n---> HINT: --model must be the model the adapter was trained on (its adapter_config.json "
                    "names base_model_name_or_path)");
      }
    }();
    adapted = L.numel();
    L.merge_into(m);
    merged = m;
    if (out_dtype != lo.dtype) merged.to(at::kCPU, out_dtype);
  }

  // Tokenizer files from the adapter folder (else its bases); the generation config from the model
  // folder at the end of the chain (else the tokenizer's folder).
  checkpoint::SaveOptions so;
  const std::string base_root = checkpoint::model_root_dir(base);
  std::string tok_dir = has_tokenizer(adapter) ? adapter : has_tokenizer(base) ? base : has_tokenizer(base_root) ? base_root : "";
  so.source_dir = tok_dir;
  so.generation_config_dir = base_root;
  merged.save_pretrained(output, so);
  std::cout << "merge-lora: wrote " << output << " (" << merged.config().architecture << ", "
            << checkpoint::torch_dtype_name(out_dtype) << "; " << adapted << " adapter parameters merged"
            << (tok_dir.empty() ? "; no tokenizer files found" : "; tokenizer from " + tok_dir) << ")" << std::endl;
  return 0;
}

}  // namespace ptk::app
