// Writes the byte-level tokenizer files (see byte_tokenizer.h). The JSON mirrors what HF tokenizers
// itself saves for a byte-level BPE (field names and order), so a diff against a Hub file reads easily.
#include "datasets/byte_tokenizer.h"

#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>

#include "core/util/fs.h"

namespace ptk::tasks {
namespace {

struct Special {
  int id;
  const char* content;
};
constexpr Special kSpecials[] = {{256, "<|endoftext|>"}, {257, "<|im_start|>"}, {258, "<|im_end|>"}};

// ChatML, as HF renders it with Jinja: one block per message, then the generation prompt.
constexpr const char* kChatTemplate =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

std::string utf8(unsigned cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {  // bytes_to_unicode stays below U+0800: two bytes
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

using Writer = rapidjson::PrettyWriter<rapidjson::StringBuffer>;

void byte_level(Writer& w) {
  w.StartObject();
  w.Key("type");
  w.String("ByteLevel");
  w.Key("add_prefix_space");
  w.Bool(false);
  w.Key("trim_offsets");
  w.Bool(true);
  w.Key("use_regex");
  w.Bool(false);
  w.EndObject();
}

void special_fields(Writer& w, const char* content) {
  w.Key("content");
  w.String(content);
  w.Key("single_word");
  w.Bool(false);
  w.Key("lstrip");
  w.Bool(false);
  w.Key("rstrip");
  w.Bool(false);
  w.Key("normalized");
  w.Bool(false);
  w.Key("special");
  w.Bool(true);
}

std::string done(rapidjson::StringBuffer& buf) { return std::string(buf.GetString(), buf.GetSize()) + "\n"; }

}  // namespace

std::string gpt2_byte_char(unsigned char b) {
  // Printable Latin-1 bytes stand for themselves; the others map to U+0100.. in byte order.
  auto printable = [](unsigned c) { return (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255); };
  if (printable(b)) return utf8(b);
  unsigned n = 0;
  for (unsigned c = 0; c < b; ++c)
    if (!printable(c)) ++n;
  return utf8(256 + n);
}

std::string byte_tokenizer_json() {
  rapidjson::StringBuffer buf;
  Writer w(buf);
  w.SetIndent(' ', 2);
  w.StartObject();
  w.Key("version");
  w.String("1.0");
  w.Key("truncation");
  w.Null();
  w.Key("padding");
  w.Null();
  w.Key("added_tokens");
  w.StartArray();
  for (const auto& s : kSpecials) {
    w.StartObject();
    w.Key("id");
    w.Int(s.id);
    special_fields(w, s.content);
    w.EndObject();
  }
  w.EndArray();
  w.Key("normalizer");
  w.Null();
  w.Key("pre_tokenizer");
  byte_level(w);
  w.Key("post_processor");
  w.Null();
  w.Key("decoder");
  byte_level(w);
  w.Key("model");
  w.StartObject();
  w.Key("type");
  w.String("BPE");
  w.Key("dropout");
  w.Null();
  w.Key("unk_token");
  w.Null();
  w.Key("continuing_subword_prefix");
  w.Null();
  w.Key("end_of_word_suffix");
  w.Null();
  w.Key("fuse_unk");
  w.Bool(false);
  w.Key("byte_fallback");
  w.Bool(false);
  w.Key("ignore_merges");
  w.Bool(false);
  w.Key("vocab");
  w.StartObject();
  for (int b = 0; b < 256; ++b) {
    std::string tok = gpt2_byte_char(static_cast<unsigned char>(b));
    w.Key(tok.c_str(), static_cast<rapidjson::SizeType>(tok.size()));
    w.Int(b);
  }
  w.EndObject();
  w.Key("merges");
  w.StartArray();
  w.EndArray();
  w.EndObject();
  w.EndObject();
  return done(buf);
}

std::string byte_tokenizer_config_json() {
  rapidjson::StringBuffer buf;
  Writer w(buf);
  w.SetIndent(' ', 2);
  w.StartObject();
  w.Key("add_bos_token");
  w.Bool(false);
  w.Key("add_prefix_space");
  w.Bool(false);
  w.Key("added_tokens_decoder");
  w.StartObject();
  for (const auto& s : kSpecials) {
    std::string id = std::to_string(s.id);
    w.Key(id.c_str());
    w.StartObject();
    special_fields(w, s.content);
    w.EndObject();
  }
  w.EndObject();
  w.Key("additional_special_tokens");
  w.StartArray();
  w.String("<|im_start|>");
  w.String("<|im_end|>");
  w.EndArray();
  w.Key("bos_token");
  w.Null();
  w.Key("chat_template");
  w.String(kChatTemplate);
  w.Key("clean_up_tokenization_spaces");
  w.Bool(false);
  w.Key("eos_token");
  w.String("<|im_end|>");
  w.Key("errors");
  w.String("replace");
  w.Key("model_max_length");
  w.Int(2048);
  w.Key("pad_token");
  w.String("<|endoftext|>");
  w.Key("split_special_tokens");
  w.Bool(false);
  w.Key("tokenizer_class");
  w.String("PreTrainedTokenizerFast");
  w.Key("unk_token");
  w.Null();
  w.EndObject();
  return done(buf);
}

std::vector<std::string> write_byte_tokenizer(const std::string& dir) {
  make_dirs(dir);
  std::string tok = dir + "/tokenizer.json", cfg = dir + "/tokenizer_config.json";
  write_file_atomic(tok, byte_tokenizer_json());
  write_file_atomic(cfg, byte_tokenizer_config_json());
  return {tok, cfg};
}

}  // namespace ptk::tasks
