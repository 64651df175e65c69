// Hugging Face config.json / generation_config.json for Qwen2 (model_type "qwen2"): every field,
// validated, with HF's defaults. Not a recipe loader (see core/config) and not model code.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ptk::checkpoint {

// rope_scaling. Only "yarn" (what Qwen2.5 uses past 32k tokens) is implemented; other types are
// refused by parse_config. Static YaRN: the same scaled frequencies at every length, as HF and vLLM.
struct RopeScaling {
  std::string type;                               // "yarn"
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;   // 0: max_position_embeddings
  std::optional<double> attention_factor;         // default 0.1*ln(factor)+1
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

// Qwen2Config of transformers (defaults are transformers' defaults).
struct Qwen2Config {
  // "Qwen2ForCausalLM" or "Qwen2ForSequenceClassification" (score head, num_labels must be 1).
  std::string architecture = "Qwen2ForCausalLM";
  int64_t vocab_size = 151936;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 22016;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads unless config.json says otherwise
  int64_t max_position_embeddings = 32768;
  std::string hidden_act = "silu";
  double initializer_range = 0.02;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool use_cache = true;
  bool tie_word_embeddings = false;
  // Read, kept and written back; sliding-window attention itself is refused (no Qwen2.5 uses it).
  bool use_sliding_window = false;
  int64_t sliding_window = 4096;
  int64_t max_window_layers = 28;
  double attention_dropout = 0.0;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // config.json may hold one id or a list
  std::optional<int64_t> pad_token_id;
  int64_t num_labels = 1;              // Qwen2ForSequenceClassification only
  std::string torch_dtype = "float32"; // dtype of the stored weights ("float32", "bfloat16", "float16")

  // The file as read: fields ptk does not model (id2label, quantization notes, ...) survive a save.
  std::string raw_json;

  bool has_score_head() const { return architecture == "Qwen2ForSequenceClassification"; }
};

// Parses config.json text; `origin` names the file in errors. Refuses another architecture or
// model_type by name, hidden_act other than silu, rope_scaling other than yarn, sliding-window
// attention, dropout, and inconsistent shapes (heads not dividing hidden, kv heads not dividing heads).
Qwen2Config parse_config(const std::string& json_text, const std::string& origin);
// `path` is a folder holding config.json, or the file itself.
Qwen2Config read_config(const std::string& path);

// config.json text as transformers writes it (2-space indent, sorted keys, trailing newline).
// When the config came from a file and nothing ptk models changed, returns that file unchanged.
std::string config_to_json(const Qwen2Config& config);

// generation_config.json for a config without one (bos/eos/pad from the config).
std::string default_generation_config_json(const Qwen2Config& config);

}  // namespace ptk::checkpoint
