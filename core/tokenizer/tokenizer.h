// ptk's tokenizer: Hugging Face tokenizer.json byte-level BPE (Qwen2/Qwen2.5 and GPT-2-style files)
// giving the ids HF `tokenizers` gives, plus Qwen2.5/ChatML chat rendering with assistant masks.
// Not a general HF pipeline: other models, normalizers and pre-tokenizers are refused at load.
//
// Threading: a loaded Tokenizer is immutable; every const method may be called from many threads
// at once (each thread keeps its own small word cache). Ownership: move-only, holds everything.
#pragma once
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
  ChatEncoding render_chat(const std::vector<Message>& messages, bool add_generation_prompt = false) const;
  // Only the text of render_chat (no encoding).
  std::string render_chat_text(const std::vector<Message>& messages, bool add_generation_prompt = false) const;

  // encode(prompt + completion) with the completion's tokens masked in (a token belongs to the
  // completion when it starts at or after the prompt's end), plus eos_id() when add_eos.
  PromptCompletionEncoding encode_prompt_completion(std::string_view prompt, std::string_view completion,
                                                    bool add_eos = true) const;

  // Implementation detail, public so internal files (chat.cpp) can reach it.
  struct Impl;
  const Impl& impl() const { return *impl_; }

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// True when `s` is well-formed UTF-8 (datasets report records that are not).
bool is_valid_utf8(std::string_view s);
// `s` with invalid UTF-8 replaced by U+FFFD per maximal subpart.
std::string to_valid_utf8(std::string_view s);
// Unicode NFC of valid UTF-8 (what the Qwen normalizer does).
std::string nfc(std::string_view s);

}  // namespace ptk::tokenizer
