// The token -> bytes table the rollout engine matches stop strings with, built from a tokenizer,
// so the engine itself stays text-free. Not a decoder (Tokenizer::decode joins and repairs UTF-8).
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace ptk::tokenizer {
class Tokenizer;
}

namespace ptk::rollout {

// table[id] = the raw bytes id decodes to (HF's ByteLevel decoder applied to the one token; added
// tokens as their content), for every id below tokenizer.vocab_size(); "" for holes. A token that
// ends inside a multi-byte UTF-8 character holds just its bytes, so concatenating the entries of a
// sequence gives exactly the bytes Tokenizer::decode repairs.
std::shared_ptr<const std::vector<std::string>> token_bytes_table(const tokenizer::Tokenizer& tokenizer);

}  // namespace ptk::rollout
