// ptk's tokenizer: Hugging Face tokenizer.json byte-level BPE (Qwen2/Qwen2.5 and GPT-2-style files)
// giving the ids HF `tokenizers` gives, plus chat rendering with the model folder's own Jinja
// chat_template (core/tokenizer/jinja.h) and assistant masks derived from the rendering.
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

#include "core/util/error.h"

namespace ptk::tokenizer {

using TokenId = int32_t;
constexpr TokenId kNoToken = -1;  // "this tokenizer has no such special token"

// One chat message. role: system | user | assistant | tool. `json`: "" for a plain {role, content}
// message; otherwise the whole message as compact JSON (members with null values dropped, as
// transformers drops them), passed to the chat template as it is: tool_calls, name, tool_call_id,
// reasoning_content, ... (a missing or null content: content is "" and `json` has no "content").
// A string content in `json` is replaced by `content` when rendering (head_messages cuts it there).
struct Message {
  std::string role;
  std::string content;
  std::string json{};
};

// What a conversation hands apply_chat_template besides its messages: TRL's "tools" and
// "chat_template_kwargs" columns. Both JSON text, "" = none (the template sees tools = none).
struct ChatExtras {
  std::string tools;   // a JSON list of tool definitions
  std::string kwargs;  // a JSON object of extra template variables, e.g. {"enable_thinking": false}
};

// tokenizer.chat_template: auto (the template the tokenizer folder carries: chat_template.jinja, else
// tokenizer_config.json's chat_template), qwen2.5 and chatml (built-in template texts), or kJinja: a
// .jinja file or inline Jinja text (LoadOptions::chat_template_source). Every one is rendered by the
// same Jinja interpreter.
enum class ChatTemplate { kAuto, kQwen25, kChatML, kJinja };
// Parses "auto" | "qwen2.5" | "chatml"; throws ptk::Error naming tokenizer.chat_template otherwise.
ChatTemplate parse_chat_template(const std::string& name);
const char* chat_template_name(ChatTemplate t);

// A tokenizer-level chat template problem (no template, one that does not parse, a file that cannot
// be read): the same for every conversation, so callers report it once rather than per record.
class ChatTemplateError : public Error {
 public:
  using Error::Error;
};

// A rendered conversation.
struct ChatEncoding {
  std::string text;                 // exactly what HF's Jinja renders from the chat template
  std::vector<TokenId> ids;         // encode(text)
  std::vector<uint8_t> assistant_mask;  // per id: 1 on tokens overlapping an assistant span (render_chat)
};

// Plain prompt + completion, encoded as one text (what HF gives for prompt + completion).
struct PromptCompletionEncoding {
  std::vector<TokenId> ids;
  std::vector<uint8_t> completion_mask;  // per id: 1 on completion tokens (and the EOS when added)
  size_t prompt_tokens = 0;              // ids before the first completion token
};

struct LoadOptions {
  // Chat template; kAuto uses the folder's own (see render_chat).
  ChatTemplate chat_template = ChatTemplate::kAuto;
  // With kJinja: a .jinja file's path, or inline Jinja text (holding "{{" or "{%").
  std::string chat_template_source{};
  // A JSON object of extra template variables for every rendering ("" = none), e.g.
  // {"enable_thinking": false}; a conversation's ChatExtras::kwargs override them.
  std::string chat_template_kwargs{};
};

// LoadOptions from tokenizer.chat_template's value: auto | qwen2.5 | chatml | a .jinja file | inline
// Jinja text; and tokenizer.chat_template_kwargs (a JSON object's text, "" = none). Throws ptk::Error
// naming the recipe key for anything else (a file that does not exist, kwargs that are not an object).
LoadOptions chat_load_options(const std::string& chat_template, const std::string& kwargs = "");

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

  // The template render_chat uses: kQwen25 / kChatML when its text is one of those templates
  // (whatever was asked for), else kJinja. Throws ChatTemplateError when there is none or it could
  // not be read or parsed (the message names the file and the fix); check it once before rendering.
  ChatTemplate chat_template() const;
  // The Jinja source of that template (throws as chat_template() does) and where it came from
  // ("DIR/tokenizer_config.json", "DIR/chat_template.jinja", "built-in qwen2.5", a file's path).
  const std::string& chat_template_source() const;
  const std::string& chat_template_origin() const;
  // Whether the template was set by LoadOptions (qwen2.5, chatml, a file) rather than taken from the
  // folder (auto): then checkpoints write it into their tokenizer files (checkpoint::SaveOptions).
  bool chat_template_overridden() const;

  // Renders `messages` with the chat template as transformers' apply_chat_template(messages,
  // tools=extras.tools, add_generation_prompt, **extras.kwargs) does (bos_token, eos_token, pad_token,
  // unk_token, ... from tokenizer_config.json; LoadOptions::chat_template_kwargs) and encodes it.
  // Assistant mask: with {% generation %} blocks in the template, 1 on tokens overlapping one (exactly
  // transformers' return_assistant_tokens_mask). Without, per assistant message i: G = render of
  // messages[:i] with the generation prompt, F = render of messages[:i+1], H = the whole rendering;
  // G must be a prefix of F and of H; the turn's span starts at len(G) in H and is the longest suffix
  // of F[len(G):] that H continues with there (all of it for prefix-preserving templates; for Qwen3's,
  // whose history turns drop <think>, the part the history keeps), less whitespace after its last
  // added token (the "\n" after <|im_end|> is the template's separator); 1 on tokens overlapping it.
  // Throws ChatTemplateError as chat_template() does; ptk::Error naming the message for a
  // conversation the template refuses (raise_exception), an empty one, a role other than system,
  // user, assistant or tool, or an assistant turn without a span (G not a prefix, nothing kept).
  // With max_ids: the first max_ids ids and mask values, encoding only head_bytes(max_ids) bytes of
  // the rendering (text is still the whole rendering).
  ChatEncoding render_chat(const std::vector<Message>& messages, bool add_generation_prompt = false,
                           size_t max_ids = SIZE_MAX, const ChatExtras& extras = ChatExtras()) const;
  // Only the text of render_chat (no encoding, no mask).
  std::string render_chat_text(const std::vector<Message>& messages, bool add_generation_prompt = false,
                               const ChatExtras& extras = ChatExtras()) const;

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
// decides the first `bytes` bytes of its rendering by a prefix-preserving template that renders
// every content byte at or after its offset among the contents (Qwen2.5's, ChatML): contents cut
// where their running total passes `bytes`, later messages left out; at most `bytes` bytes of
// contents are copied. (render_chat no longer relies on it: templates such as Qwen3's render earlier
// turns differently once later ones are gone.)
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
