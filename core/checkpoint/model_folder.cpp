// Model-folder and tokenizer-fit checks (see model_folder.h).
#include "core/checkpoint/model_folder.h"

#include "core/checkpoint/adapter_config.h"

#include <filesystem>
#include <string>
#include <vector>

#include "core/util/error.h"
#include "core/util/fs.h"

namespace fs = std::filesystem;

namespace ptk::checkpoint {
namespace {

bool has_weights(const std::string& dir) {
  return path_exists(dir + "/model.safetensors") || path_exists(dir + "/model.safetensors.index.json");
}

// The model folders inside a run folder or a checkpoints/ folder: final/, the newest step-N.
std::string model_inside(const std::string& dir) {
  if (path_exists(dir + "/final/config.json") || is_adapter_folder(dir + "/final")) return dir + "/final";
  std::string ckpts = path_exists(dir + "/checkpoints") ? dir + "/checkpoints" : dir;
  std::string best;
  long best_step = -1;
  std::error_code ec;
  for (auto it = fs::directory_iterator(ckpts, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("step-", 0) != 0 ||
        !(path_exists(it->path().string() + "/config.json") || is_adapter_folder(it->path().string())))
      continue;
    try {
      long step = std::stol(name.substr(5));
      if (step > best_step) best_step = step, best = it->path().string();
    } catch (const std::exception&) {
    }
  }
  return best;
}

}  // namespace

std::string model_folder_problem(const std::string& dir) {
  std::error_code ec;
  if (dir.empty()) return "the path is empty";
  if (!fs::exists(dir, ec)) return "it does not exist";
  if (!fs::is_directory(dir, ec)) return "it is a file, not a folder (give the folder that holds it: " + parent_dir(dir) + ")";
  if (is_adapter_folder(dir)) {
    // A PEFT adapter folder: its weights, and a base model folder to go onto.
    if (!path_exists(dir + "/" + kAdapterWeightsFile)) return std::string("it is an adapter folder without ") + kAdapterWeightsFile;
    try {
      const std::string base = model_root_dir(dir);
      const std::string problem = model_folder_problem(base);
      if (!problem.empty()) return "it is an adapter folder whose base model " + base + " is not a model folder: " + problem;
    } catch (const Error& e) {
      return std::string("it is an adapter folder whose base model cannot be found: ") + e.what();
    }
    return "";
  }
  const bool config = path_exists(dir + "/config.json"), weights = has_weights(dir);
  if (config && weights) return "";
  if (!weights && (path_exists(dir + "/final") || path_exists(dir + "/checkpoints") || path_exists(dir + "/metrics.jsonl")))
    return "it is a ptk run folder (its config.json is the run's recipe; the model is in final/ or checkpoints/step-N)";
  if (!weights && !model_inside(dir).empty()) return "it is a checkpoints/ folder (each step-N in it is a model folder)";
  const bool tokenizer = path_exists(dir + "/tokenizer.json") || path_exists(dir + "/tokenizer_config.json");
  std::vector<std::string> other;
  for (const char* f : {"pytorch_model.bin", "model.bin", "consolidated.safetensors"})
    if (path_exists(dir + "/" + f)) other.push_back(f);
  std::string missing = !config && !weights ? "has no config.json and no model.safetensors (or model.safetensors.index.json)"
                        : !config           ? "has no config.json"
                                            : "has no model.safetensors (or model.safetensors.index.json)";
  if (!other.empty()) missing += "; it holds " + other.front() + ", which ptk does not read (save with safetensors)";
  else if (tokenizer && !config && !weights) missing += ": it holds tokenizer files only";
  return missing;
}

void require_model_folder(const std::string& dir, const std::string& what) {
  const std::string problem = model_folder_problem(dir);
  if (problem.empty()) return;
  std::string msg = what + " = " + dir + " is not a model folder: " + problem +
                    ".\nA model folder (a Hugging Face save_pretrained folder, or a ptk run's final/ or "
                    "checkpoints/step-N) holds config.json, model.safetensors or model-*-of-*.safetensors with "
                    "model.safetensors.index.json, and usually tokenizer.json and tokenizer_config.json.";
  std::error_code ec;
  const std::string inside = fs::is_directory(dir, ec) ? model_inside(dir) : "";
  if (!inside.empty()) msg += "\n---> HINT: the model of this run folder is " + inside + "; use " + what + "=" + inside;
  else if (problem.find("tokenizer files only") != std::string::npos)
    msg += "\n---> HINT: a tokenizer folder goes in tokenizer.path (--tokenizer); " + what + " names the weights' folder";
  else
    msg += "\n---> HINT: check " + what + (what.rfind("--", 0) == 0 ? "" : " (or use model.config for a random init)");
  throw Error(msg);
}

void check_tokenizer_fits(int64_t tokenizer_ids, const std::string& tokenizer_path, int64_t model_vocab,
                          const std::string& model_dir) {
  if (tokenizer_ids <= model_vocab) return;
  throw Error("the tokenizer at " + tokenizer_path + " has " + std::to_string(tokenizer_ids) + " ids but the model at " +
              model_dir + " has vocab_size " + std::to_string(model_vocab) +
              " (embedding rows): ids past it cannot be embedded\n---> HINT: the model and tokenizer do not belong "
              "together; check the model folder and the tokenizer (--tokenizer / tokenizer.path)");
}

}  // namespace ptk::checkpoint
