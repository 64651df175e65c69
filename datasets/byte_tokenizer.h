// A byte-level tokenizer in Hugging Face's tokenizer.json format — 256 byte tokens plus the ChatML
// special tokens, no merges — so the tiny CPU demo has a 259-token vocabulary instead of Qwen's
// 151,936. Writes files only; encoding is core/tokenizer's job (and HF's, which loads these files).
#pragma once
#include <string>
#include <vector>

namespace ptk::tasks {

// Layout (ids are what the demo model's vocab_size must cover):
//   0..255  one token per byte, id == byte value; each token's text is GPT-2's bytes_to_unicode
//           character for that byte ("!" for 0x21, "Ġ" for a space, "Ā" for 0x00)
//   256 <|endoftext|> (pad), 257 <|im_start|>, 258 <|im_end|> (eos): added tokens, special
constexpr int kByteTokenizerVocabSize = 259;

// GPT-2's bytes_to_unicode(): the UTF-8 text of the character standing for byte `b`.
std::string gpt2_byte_char(unsigned char b);

// tokenizer.json: model BPE with the 256 byte tokens as vocab and empty merges; ByteLevel
// pre-tokenizer (add_prefix_space false, use_regex false: with no merges a regex split cannot change
// the ids, and without it a reader needs only the byte map) and ByteLevel decoder; no normalizer, so
// bytes pass through unchanged. HF tokenizers 0.23 loads it (tests/tasks/byte_tokenizer_test.cpp).
std::string byte_tokenizer_json();

// tokenizer_config.json: eos <|im_end|>, pad <|endoftext|>, no bos, and a ChatML chat_template
// without Qwen's default system prompt (the demo's prompts stay short):
//   <|im_start|>{role}\n{content}<|im_end|>\n ... then "<|im_start|>assistant\n" with add_generation_prompt.
std::string byte_tokenizer_config_json();

// Writes both files into `dir` (created), atomically; returns their paths.
std::vector<std::string> write_byte_tokenizer(const std::string& dir);

}  // namespace ptk::tasks
