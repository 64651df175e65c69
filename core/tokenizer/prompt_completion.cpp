#include "core/tokenizer/prompt_completion.h"

#include "core/util/error.h"

namespace ptk::tokenizer {

PromptCompletionEncoding encode_prompt_completion_apart(const Tokenizer& tok, std::string_view prompt,
                                                        std::string_view completion, bool add_eos, size_t max_ids,
                                                        bool* boundary_merged) {
  if (add_eos && tok.ends_with_eos(completion)) add_eos = false;  // TRL: no second EOS
  if (add_eos && tok.eos_id() == kNoToken)
    throw Error("tokenizer: add_eos asked but this tokenizer has no EOS token\n---> HINT: set eos_token in "
                "tokenizer_config.json");
  PromptCompletionEncoding r;
  // encode_head(text, n) is the first n ids of encode(text), from at most head_bytes(n) bytes of it
  // (the whole text when n is SIZE_MAX).
  r.ids = tok.encode_head(prompt, max_ids);
  r.prompt_tokens = r.ids.size();
  if (r.ids.size() < max_ids) {
    std::vector<TokenId> c = tok.encode_head(completion, max_ids - r.ids.size());
    r.ids.insert(r.ids.end(), c.begin(), c.end());
    if (add_eos && r.ids.size() < max_ids) r.ids.push_back(tok.eos_id());
  }
  r.completion_mask.assign(r.ids.size(), 1);
  std::fill(r.completion_mask.begin(), r.completion_mask.begin() + static_cast<std::ptrdiff_t>(r.prompt_tokens), 0);
  if (boundary_merged) *boundary_merged = tok.encode_prompt_completion(prompt, completion, add_eos, max_ids).ids != r.ids;
  return r;
}

}  // namespace ptk::tokenizer
