// Internal to core/tokenizer: the state behind Tokenizer's pimpl (BPE model, added-token matcher,
// pre-tokenizer, special ids, chat settings). Not a public header: include tokenizer.h instead.
#pragma once
#include <absl/container/flat_hash_map.h>
#include <rapidjson/document.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/tokenizer/jinja.h"
#include "core/tokenizer/pretokenizer.h"
#include "core/tokenizer/tokenizer.h"

namespace ptk::tokenizer {

struct AddedToken {
  std::string content;
  TokenId id = kNoToken;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
  std::string bytes;  // what decode() emits for it (ByteLevel decoder applied to content)
};

// aho-corasick's LeftmostLongest over a small set of literal patterns (added tokens).
class AddedMatcher {
 public:
  void build(std::vector<std::pair<std::string, int>> patterns);  // (content, index into added)
  bool empty() const { return patterns_.empty(); }
  // First match at or after `from`: leftmost start, then longest. False when none.
  bool find(std::string_view text, size_t from, size_t* b, size_t* e, int* which) const;

 private:
  std::vector<std::pair<std::string, int>> patterns_;  // sorted by first byte, then length desc
  uint16_t first_[256][2] = {};                         // [begin, end) into patterns_ per first byte
  int distinct_first_ = 0;
  unsigned char only_first_ = 0;
};

// Byte-level BPE as HF's models::bpe::BPE with dropout off.
struct BpeModel {
  absl::flat_hash_map<std::string, TokenId> vocab;  // vocabulary form ("Ġhello")
  std::vector<std::string> id_to_token;             // vocabulary form, "" for holes
  std::vector<std::string> id_bytes;                // the bytes a token decodes to
  std::vector<uint32_t> id_len;                     // id_bytes[id].size(), packed (token offsets for masks)
  absl::flat_hash_map<uint64_t, uint64_t> merges;   // (left << 32 | right) -> (rank << 32 | merged id)
  TokenId byte_id[256];                             // id of each byte's alphabet character, or kNoToken
  TokenId unk = kNoToken;
  bool fuse_unk = false;
  bool ignore_merges = false;

  // Appends the ids of one pre-token (raw bytes; byte-level mapping is implicit). `cache_uid`
  // identifies the owning tokenizer in the calling thread's word cache.
  void encode_word(std::string_view word, uint64_t cache_uid, std::vector<TokenId>* out) const;
};

struct Tokenizer::Impl {
  BpeModel bpe;
  std::vector<AddedToken> added;
  absl::flat_hash_map<TokenId, int> added_by_id;
  absl::flat_hash_map<std::string, int> added_by_content;
  AddedMatcher raw_matcher, normalized_matcher;
  bool nfc = false;
  std::unique_ptr<RegexSplitter> splitter;  // nullptr: the whole piece is one word
  size_t vocab_size = 0;
  uint64_t uid = 0;  // keys the per-thread word cache

  TokenId eos = kNoToken, pad = kNoToken, im_start = kNoToken, im_end = kNoToken;

  // Chat (chat.cpp): the parsed template (and a list-form "tool_use" one), its source and origin, or
  // why there is none; what it is recognised as; what every rendering's context holds besides the
  // conversation (special tokens, LoadOptions::chat_template_kwargs).
  ChatTemplate chat = ChatTemplate::kJinja;
  std::string chat_error;
  std::shared_ptr<const jinja::Template> chat_tmpl, chat_tmpl_tools;
  std::string chat_source, chat_origin;
  bool chat_overridden = false;
  rapidjson::Document chat_globals;
  std::string default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

  // Bounds for encode_head/encode_tail (see tokenizer.h): the longest id in bytes, and whether an
  // id always covers 1..longest bytes (no lstrip/rstrip added token, every byte in the alphabet).
  size_t longest_bytes = 1;
  bool ids_bounded = false;

  // encode_head/encode_tail's bounded encoding: pre-tokens longer than `window` bytes are merged a
  // window at a time (`margin` bytes left open at each window's end), and only the last `keep` ids
  // are kept (SIZE_MAX: all), counting the ones dropped.
  struct Tail {
    size_t keep = SIZE_MAX, dropped = 0;
    size_t window = 0, margin = 0;
    void trim(std::vector<TokenId>* ids) {
      if (keep == SIZE_MAX || ids->size() <= 2 * keep + 4096) return;
      size_t cut = ids->size() - keep;
      ids->erase(ids->begin(), ids->begin() + static_cast<std::ptrdiff_t>(cut));
      dropped += cut;
    }
  };

  // A Tail with head_bytes' margin and a window of Tokenizer::kTailWindowBytes (at least 8 margins).
  Tail bounded(size_t keep = SIZE_MAX) const {
    Tail t;
    t.keep = keep;
    t.margin = Tokenizer::kHeadMarginIds * longest_bytes;
    t.window = std::max(Tokenizer::kTailWindowBytes, 8 * (t.margin + longest_bytes));
    return t;
  }

  // Encodes valid UTF-8 `text`, appending to `ids`; when `starts` is given, appends each token's
  // start byte in `text` (exact except inside a line that NFC changed: then the line's start, or
  // `cut` for a token that starts at or after `cut` in that line, unless NFC composes across `cut`).
  // With `tail` (starts must be null): huge pre-tokens merged by windows, ids before the last
  // tail->keep dropped as they come.
  void encode_into(std::string_view text, std::vector<TokenId>* ids, std::vector<uint32_t>* starts,
                   Tail* tail = nullptr, uint32_t cut = UINT32_MAX) const;
  void encode_plain(std::string_view piece, uint32_t base, std::vector<TokenId>* ids, std::vector<uint32_t>* starts,
                    Tail* tail) const;
  void encode_normalized(std::string_view piece, uint32_t base, std::vector<TokenId>* ids,
                         std::vector<uint32_t>* starts, Tail* tail, uint32_t cut = UINT32_MAX) const;
  // One pre-token for encode_tail: whole, or a window at a time when longer than tail->window.
  void encode_word_tail(std::string_view word, std::vector<TokenId>* ids, Tail* tail) const;
};

}  // namespace ptk::tokenizer

namespace ptk::tokenizer {
// The chat templates a tokenizer folder carries: tokenizer_config.json's "chat_template" (a string,
// or the list form's "default" and "tool_use"), and chat_template.jinja beside it (transformers 5's
// form, which wins over the config's, as in transformers).
struct FolderTemplates {
  bool has_config_default = false, has_config_tool_use = false, has_file = false;
  std::string config_default, config_tool_use, file;
  std::string config_origin, file_origin;  // paths for messages
  const rapidjson::Value* config = nullptr;  // the parsed tokenizer_config.json (special tokens), or null
};
// chat.cpp: sets impl's chat fields from the options and the folder's templates. Throws
// ChatTemplateError when a template the options name cannot be read or parsed (a folder's own
// template that does not parse is kept as chat_error: plain-text use of the tokenizer still works).
void resolve_chat_template(Tokenizer::Impl* impl, const LoadOptions& options, const FolderTemplates& folder);
}  // namespace ptk::tokenizer
