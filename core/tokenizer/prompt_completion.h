// Plain-text prompt + completion tokenized the way a model meets them at generation: the prompt
// encoded alone, the completion encoded alone after it. Not chat rendering (chat.cpp) and not the
// one-text encoding Tokenizer::encode_prompt_completion keeps for comparison.
//
// Why apart: encoded as one text, BPE (and the pre-tokenizer) can merge across the boundary — the
// prompt "Describe it." and the completion "Making" give '.M'|'aking' with Qwen2.5's vocabulary — and
// the merged token is neither prompt nor completion: masked out, the completion's first characters
// are never trained; masked in (TRL's SFTTrainer, from the common prefix of the two encodings), the
// model is trained on ids it never sees at generation, where the prompt ends with '.' and the model
// must produce 'Making'. Apart, every completion character is trained and training ids equal the
// ids of generation (prompt encoded alone, then continued).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/tokenizer/tokenizer.h"

namespace ptk::tokenizer {

// encode(prompt) ++ encode(completion) (++ eos_id() when add_eos and the completion does not already
// end with the EOS token's text, TRL's rule), completion_mask 1 on the completion's ids and the EOS,
// prompt_tokens = the prompt's ids. With max_ids: the first max_ids ids and mask values of that,
// encoding at most head_bytes(max_ids) bytes of each text (prompt_tokens capped at max_ids).
// boundary_merged (optional): set to whether encoding prompt + completion as one text gives other
// ids within those first max_ids (a merge or pre-token across the boundary, as '.M'|'aking'); that
// costs a second encoding of the record, so pass nullptr when the answer is not wanted.
PromptCompletionEncoding encode_prompt_completion_apart(const Tokenizer& tok, std::string_view prompt,
                                                        std::string_view completion, bool add_eos = true,
                                                        size_t max_ids = SIZE_MAX, bool* boundary_merged = nullptr);

}  // namespace ptk::tokenizer
