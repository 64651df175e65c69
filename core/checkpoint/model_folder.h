// What a command checks before it reads a model folder: that the path is a Hugging Face model folder
// (config.json + safetensors weights), with an error that names the folder, what is missing and what
// such a folder holds (pointing at final/ or checkpoints/step-N when given a run folder), rather than
// a tokenizer or tensor error later; and that a tokenizer fits the model's embedding. Torch-free.
#pragma once
#include <cstdint>
#include <string>

namespace ptk::checkpoint {

// "" when `dir` holds config.json and model.safetensors (or model.safetensors.index.json), or is a
// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) whose base is such a folder; else
// the reason, e.g. "has no config.json and no *.safetensors weights (it holds tokenizer files only)".
std::string model_folder_problem(const std::string& dir);

// Throws ptk::Error when model_folder_problem(dir) is not empty: "<what> = <dir> is not a model
// folder: <reason>" plus what a model folder holds and, for a run or checkpoints folder, the model
// folder inside it. `what` names the setting ("model.path", "--model").
void require_model_folder(const std::string& dir, const std::string& what);

// Refuses a tokenizer with more ids than the model's embedding has rows (the ids past it would
// index out of the embedding): names both paths and what to check. The training stages' check.
void check_tokenizer_fits(int64_t tokenizer_ids, const std::string& tokenizer_path, int64_t model_vocab,
                          const std::string& model_dir);

}  // namespace ptk::checkpoint
