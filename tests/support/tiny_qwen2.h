// The tiny Qwen2 shape unit tests share: 2 layers, hidden 32, 4 query / 2 K/V heads of 8, MLP 64,
// tied embeddings, RoPE base 1e4. Test code only.
#pragma once
#include <cstdint>

#include "core/checkpoint/hf_config.h"

namespace ptk::test {

inline checkpoint::Qwen2Config tiny_qwen2_config(int64_t vocab, int64_t max_positions) {
  checkpoint::Qwen2Config c;
  c.vocab_size = vocab;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = max_positions;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = true;
  return c;
}

// A small Qwen2 shape with 16-wide heads (the CPU kernels' and packed decode layout's width): 2 layers,
// hidden 64, 4 query / 2 K/V heads, MLP 96, vocabulary 97, RoPE base 1e6.
inline checkpoint::Qwen2Config small_qwen2_config(bool tied = true) {
  checkpoint::Qwen2Config c;
  c.vocab_size = 97;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 512;
  c.rope_theta = 1e6;
  c.tie_word_embeddings = tied;
  return c;
}

// The same over make-data's byte tokenizer: 256 bytes + 3 ChatML specials (pad 256, eos 258).
inline checkpoint::Qwen2Config tiny_byte_qwen2_config() {
  auto c = tiny_qwen2_config(259, 128);
  c.eos_token_ids = {258};
  c.pad_token_id = 256;
  return c;
}

}  // namespace ptk::test
