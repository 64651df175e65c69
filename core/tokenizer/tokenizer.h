// ptk's tokenizer: Hugging Face tokenizer.json byte-level BPE (Qwen2/Qwen2.5 and GPT-2-style files)
// giving the ids HF `tokenizers` gives, plus Qwen2.5/ChatML chat rendering with assistant masks.
// Not a general HF pipeline: other models, normalizers and pre-tokenizers are refused at load.
//
// Threading: a loaded Tokenizer is immutable; every const method may be called from many threads
// at once (each thread keeps its own small word cache). Ownership: move-only, holds everything.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ptk::tokenizer {

using TokenId = int32_t;
constexpr TokenId kNoToken = -1;  // "this tokenizer has no such special token"

// One chat turn. role: system | user | assistant. (Tool calls and tool messages are refused.)
struct Message {
  std::string role;
  std::string content;
};

// tokenizer.chat_template: auto (recognise tokenizer_config.json's template), qwen2.5, chatml.
enum class ChatTemplate { kAuto, kQwen25, kChatML };
// Parses "auto" | "qwen2.5" | "chatml"; throws ptk::Error naming tokenizer.chat_template otherwise.
ChatTemplate parse_chat_template(const std::string& name);
const char* chat_template_name(ChatTemplate t);

// A rendered conversation.
struct ChatEncoding {
  std::string text;                 // exactly what HF's Jinja renders from the chat template
  std::vector<TokenId> ids;         // encode(text)
  std::vector<uint8_t> assistant_mask;  // per id: 1 on tokens overlapping an assistant content or its <|im_end|>
};

// Plain prompt + completion, encoded as one text (what HF gives for prompt + completion).
struct PromptCompletionEncoding {
  std::vector<TokenId> ids;
  std::vector<uint8_t> completion_mask;  // per id: 1 on completion tokens (and the EOS when added)
  size_t prompt_tokens = 0;              // ids before the first completion token
};

struct LoadOptions {
  // Chat renderer; kAuto reads chat_template from tokenizer_config.json (see render_chat).
  ChatTemplate chat_template = ChatTemplate::kAuto;
};

class Tokenizer {
 public:
  // `path`: a folder holding tokenizer.json (and optionally tokenizer_config.json), or a
  // tokenizer.json file (tokenizer_config.json is then looked for beside it). Throws ptk::Error
  // naming the file and JSON path of anything unsupported, with a hint.
  static Tokenizer load(const std::string& path, LoadOptions options = {});
  // From the JSON text of a tokenizer.json (and optionally of a tokenizer_config.json; "" = none).
  // `origin` names them in error messages.
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view config_json = {},
                             const std::string& origin = "tokenizer.json", LoadOptions options = {});

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Ids of `text`, as HF `tokenizer.encode(text)` (added tokens in the text are matched; Qwen's
  // post-processor adds nothing). Invalid UTF-8 is first replaced by U+FFFD per maximal subpart,
  // which is what a Python/JS/Rust caller's lossy decoding hands HF; use is_valid_utf8() to refuse it.
  std::vector<TokenId> encode(std::string_view text) const;
  // encode() of each text on `threads` threads (0 = every core), results in input order.
  std::vector<std::vector<TokenId>> encode_batch(const std::vector<std::string>& texts, int threads = 0) const;
  // HF `tokenizer.decode(ids, skip_special_tokens)`: byte-level decoding, invalid UTF-8 from a cut
  // multi-byte character shown as U+FFFD. Ids out of range throw ptk::Error.
  std::string decode(const std::vector<TokenId>& ids, bool skip_special = false) const;

  // Total ids, model vocabulary plus added tokens (max id + 1). Qwen2.5: 151665.
  size_t vocab_size() const;
  TokenId token_to_id(std::string_view token) const;  // added tokens first; kNoToken if absent
  std::string id_to_token(TokenId id) const;          // vocabulary form ("Ġhello"); "" if absent
  bool is_special(TokenId id) const;                  // an added token marked special

  // From tokenizer_config.json (eos_token, pad_token), else <|endoftext|> where present.
  TokenId eos_id() const;
  // Whether `text` ends with the EOS token's text: TRL appends the EOS to a text only when it does
  // not (encode_prompt_completion's add_eos, prepare's language-modeling text and replies).
  bool ends_with_eos(std::string_view text) const;
  TokenId pad_id() const;
  TokenId im_start_id() const;  // <|im_start|>, kNoToken if absent
  TokenId im_end_id() const;    // <|im_end|>, kNoToken if absent

  // The renderer render_chat uses, after `auto` resolution. Throws ptk::Error when `auto` could not
  // recognise tokenizer_config.json's template (the message names tokenizer.chat_template).
  ChatTemplate chat_template() const;
  // Renders `messages` as the chat template does and encodes the text. qwen2.5: ChatML with the
  // default system prompt ("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
  // or the one in the recognised template) when the first message is not a system message.
  // chatml: every message as is. add_generation_prompt appends "<|im_start|>assistant\n".
  // Throws ptk::Error for an empty conversation, an unknown role or a tool message.
  // With max_ids: the first max_ids ids and mask values of the whole rendering, from a rendering of
  // head_messages({&messages}, head_bytes(max_ids)) (text is then that cut rendering).
  ChatEncoding render_chat(const std::vector<Message>& messages, bool add_generation_prompt = false,
                           size_t max_ids = SIZE_MAX) const;
  // Only the text of render_chat (no encoding).
  std::string render_chat_text(const std::vector<Message>& messages, bool add_generation_prompt = false) const;

  // encode(prompt + completion) with the completion's tokens masked in (a token belongs to the
  // completion when it starts at or after the prompt's end), plus eos_id() when add_eos.
  // With max_ids: the first max_ids ids and mask values (prompt_tokens capped at max_ids), encoding
  // at most head_bytes(max_ids) bytes of prompt + completion.
  PromptCompletionEncoding encode_prompt_completion(std::string_view prompt, std::string_view completion,
                                                    bool add_eos = true, size_t max_ids = SIZE_MAX) const;

  // ---- Long texts in bounded memory (datasets keep at most data.max_seq_len ids of a text) ----
  // Bytes at the start of a text that decide its first `n` ids. An id covers 1 to
  // longest_token_bytes() bytes of the normalized text and NFC shortens text at most 3x, so the
  // first n ids come from the first 3 * n * longest bytes. Cutting the text further on changes only
  // ids near the cut (the pre-token the cut falls in, the whitespace run before it, BPE merges next
  // to it), and kHeadMarginIds more ids' worth of bytes keep those away from the first n. That
  // locality is not a theorem of BPE (a merge chain could in principle reach further back), so
  // tests/tokenizer/long_text_test.cpp checks it at every cut position around the hard cases.
  // SIZE_MAX when this tokenizer gives no such bound (an added token with lstrip/rstrip swallows
  // any amount of whitespace; bytes outside the BPE alphabet make no id or fuse into one).
  static constexpr size_t kHeadMarginIds = 64;
  size_t head_bytes(size_t n) const;
  // Longest id in bytes (model vocabulary and added tokens); Qwen2.5: 128.
  size_t longest_token_bytes() const;
  // The first min(n, size) ids of encode(text), encoding at most head_bytes(n) bytes of it (cut
  // at a character boundary; see head_bytes).
  std::vector<TokenId> encode_head(std::string_view text, size_t n) const;
  // The last min(n, size) ids of encode(text) and (*total) how many ids encode(text) has. One pass
  // over the whole text that keeps O(n) ids; a pre-token longer than kTailWindowBytes (one huge
  // "word") is merged a window at a time, each window's ids kept up to head_bytes' margin before
  // its end and the next window starting at that id boundary, so memory stays bounded by the
  // window, not the text. Used where ids are cut from the left (DPO prompts keep their end).
  static constexpr size_t kTailWindowBytes = size_t{1} << 20;
  std::vector<TokenId> encode_tail(std::string_view text, size_t n, size_t* total) const;

  // Implementation detail, public so internal files (chat.cpp) can reach it.
  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One conversation given in parts (e.g. a prompt's messages, then its completion's) cut to what
// decides the first `bytes` bytes of its rendering: contents cut where their running total passes
// `bytes`, later messages left out. Every content byte renders at or after its offset among the
// contents, so the rendering of the result equals that of the whole for at least `bytes` bytes;
// at most `bytes` bytes of contents are copied.
std::vector<Message> head_messages(const std::vector<const std::vector<Message>*>& parts, size_t bytes);

// `s` cut to its first `bytes` bytes, moved forward to the next character boundary (so at least
// `bytes` bytes are kept); `s` itself when it is not longer. Never splits a UTF-8 sequence of valid text.
std::string_view utf8_head(std::string_view s, size_t bytes);

// True when `s` is well-formed UTF-8 (datasets report records that are not).
bool is_valid_utf8(std::string_view s);
// `s` with invalid UTF-8 replaced by U+FFFD per maximal subpart.
std::string to_valid_utf8(std::string_view s);
// Unicode NFC of valid UTF-8 (what the Qwen normalizer does).
std::string nfc(std::string_view s);

}  // namespace ptk::tokenizer
