// The Qwen2.5-0.5B shape (config.json of Qwen/Qwen2.5-0.5B) for random-init tests and benchmarks at
// real size. Not a checkpoint: no weights, no tokenizer.
#pragma once
#include "core/checkpoint/hf_config.h"  // Qwen2Config

namespace ptk::test {

inline checkpoint::Qwen2Config qwen25_05b_config() {
  checkpoint::Qwen2Config c;
  c.vocab_size = 151936;
  c.hidden_size = 896;
  c.intermediate_size = 4864;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 14;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 32768;
  c.rope_theta = 1000000.0;
  c.rms_norm_eps = 1e-6;
  c.tie_word_embeddings = true;
  c.eos_token_ids = {151643};
  return c;
}

}  // namespace ptk::test
