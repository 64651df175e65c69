// PEFT's LoRA adapter folders (adapter_config.json + adapter_model.safetensors), torch-free: reading
// and writing adapter_config.json as PEFT 0.22 does, telling an adapter folder from a model folder,
// and finding the base model an adapter belongs to. The tensors and the model side are in
// core/model/lora.h. Not a general PEFT reader: only plain LoRA on Qwen2's linears (no DoRA, no
// per-module rank/alpha patterns, no LoRA biases, no layer subsets) is accepted; the rest is refused
// by name.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ptk::checkpoint {

constexpr const char* kAdapterConfigFile = "adapter_config.json";
constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";

struct AdapterConfig {
  std::string base_model;    // base_model_name_or_path: the folder the adapter goes onto ("" = unknown)
  std::string task_type = "CAUSAL_LM";  // CAUSAL_LM | SEQ_CLS
  int64_t r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0;
  bool use_rslora = false;   // scaling alpha / sqrt(r) instead of alpha / r
  // target_modules as a list: module names matched as PEFT does (the name itself or its last
  // components, e.g. "q_proj" or "model.layers.0.self_attn.q_proj"); or, when PEFT wrote a string, a
  // regular expression matched against the whole module name (target_regex).
  std::vector<std::string> target_modules;
  std::optional<std::string> target_regex;
  std::vector<std::string> modules_to_save;  // e.g. ["score"]
  std::string init_lora_weights = "true";    // "true" (Kaiming-uniform A) | "gaussian"

  double scaling() const;
  // Whether linear `module` ("model.layers.3.self_attn.q_proj") gets an adapter.
  bool targets(const std::string& module) const;
};

// True when `dir` holds adapter_config.json (a PEFT adapter folder rather than a model folder).
bool is_adapter_folder(const std::string& dir);

// Parses adapter_config.json text; `origin` names the file in errors. Refuses another peft_type,
// DoRA, LoRA biases, rank/alpha patterns, layer subsets, fan_in_fan_out, and other modules_to_save
// targets than ptk has (score, embed_tokens, lm_head).
AdapterConfig parse_adapter_config(const std::string& json_text, const std::string& origin);
AdapterConfig read_adapter_config(const std::string& dir);

// adapter_config.json with the fields of PEFT's LoraConfig that describe a plain LoRA adapter, sorted,
// 2-space indent, as PEFT 0.22's save_pretrained writes them (the fields left out take PEFT's
// defaults when PEFT loads it).
std::string adapter_config_json(const AdapterConfig& c);

// The folder an adapter folder's base_model_name_or_path names: absolute as written, else relative
// to the adapter folder. Throws a ptk::Error naming the adapter when it is missing or not a folder.
// The base may itself be an adapter folder (a chain); see model_root_dir.
std::string adapter_base_dir(const std::string& adapter_dir);

// For a model folder: itself. For an adapter folder: the model folder at the end of its chain of
// bases (at most 8 adapters deep). Where config.json is read from.
std::string model_root_dir(const std::string& dir);

// The pad token id a tokenizer folder declares (tokenizer_config.json's pad_token, else eos_token,
// looked up among tokenizer.json's added tokens); nullopt when it cannot be told.
std::optional<int64_t> folder_pad_token_id(const std::string& dir);

}  // namespace ptk::checkpoint
