// config.json of tiny_qwen2.h's shape over make-data's byte tokenizer (vocab 259: pad 256, eos 258),
// with 256 positions: for tests that start a ptk stage from `model.config` (random init). Test code only.
#pragma once

namespace ptk::test {

inline constexpr const char* kTinyByteModelJson = R"({
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259, "hidden_size": 32,
  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
  "initializer_range": 0.02, "tie_word_embeddings": true, "use_sliding_window": false,
  "attention_dropout": 0.0, "bos_token_id": null, "eos_token_id": 258, "pad_token_id": 256,
  "torch_dtype": "float32"})";

}  // namespace ptk::test
