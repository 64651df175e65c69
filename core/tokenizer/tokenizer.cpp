// Tokenizer loading (tokenizer.json + tokenizer_config.json), encoding and decoding as HF
// `tokenizers` does for byte-level BPE files. Not chat rendering (chat.cpp) nor BPE merging (bpe.cpp).
#include "core/tokenizer/tokenizer.h"

#include <absl/strings/string_view.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>

#include "core/tokenizer/tokenizer_impl.h"
#include "core/tokenizer/unicode.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::tokenizer {

namespace {

std::atomic<uint64_t> g_next_uid{1};

[[noreturn]] void refuse(const std::string& origin, const std::string& path, const std::string& what,
                         const std::string& hint) {
  throw Error(origin + ": " + path + ": " + what + "\n---> HINT: " + hint);
}

const char* kUnsupportedHint =
    "ptk supports byte-level BPE tokenizer.json files (Qwen2/Qwen2.5, GPT-2 style); convert this tokenizer "
    "or use one of those";

std::string type_of(const rapidjson::Value& v) {
  if (v.IsObject() && v.HasMember("type") && v["type"].IsString()) return v["type"].GetString();
  return "";
}

bool get_bool(const rapidjson::Value& obj, const char* key, bool dflt, const std::string& origin,
              const std::string& path) {
  if (!obj.HasMember(key) || obj[key].IsNull()) return dflt;
  if (!obj[key].IsBool())
    refuse(origin, path + "." + key, std::string("expected true or false, got ") + json::type_name(obj[key]),
           "fix the file");
  return obj[key].GetBool();
}

// "<|endoftext|>" or {"content": "<|endoftext|>", ...} in tokenizer_config.json.
std::string token_text(const rapidjson::Value& cfg, const char* key) {
  if (!cfg.HasMember(key)) return "";
  const auto& v = cfg[key];
  if (v.IsString()) return v.GetString();
  if (v.IsObject() && v.HasMember("content") && v["content"].IsString()) return v["content"].GetString();
  return "";
}

// The chat templates of a tokenizer folder (see FolderTemplates): `cfg` is the parsed
// tokenizer_config.json or null, `jinja` chat_template.jinja's text or null.
FolderTemplates folder_templates(const rapidjson::Value* cfg, const std::string& cfg_origin, const std::string* jinja,
                                 const std::string& jinja_origin) {
  FolderTemplates f;
  f.config = cfg;
  f.config_origin = cfg_origin;
  f.file_origin = jinja_origin;
  if (jinja) {
    f.has_file = true;
    f.file = *jinja;
  }
  if (cfg && cfg->IsObject() && cfg->HasMember("chat_template")) {
    const auto& ct = (*cfg)["chat_template"];
    if (ct.IsString()) {
      f.config_default.assign(ct.GetString(), ct.GetStringLength());
      f.has_config_default = true;
    } else if (ct.IsArray()) {
      for (const auto& e : ct.GetArray()) {
        if (!(e.IsObject() && e.HasMember("name") && e["name"].IsString() && e.HasMember("template") &&
              e["template"].IsString()))
          continue;
        std::string name = e["name"].GetString();
        if (name == "default") {
          f.config_default.assign(e["template"].GetString(), e["template"].GetStringLength());
          f.has_config_default = true;
        } else if (name == "tool_use") {
          f.config_tool_use.assign(e["template"].GetString(), e["template"].GetStringLength());
          f.has_config_tool_use = true;
        }
      }
    }
  }
  return f;
}

void load_normalizer(const rapidjson::Value& n, const std::string& origin, Tokenizer::Impl* impl) {
  if (n.IsNull()) return;
  std::string t = type_of(n);
  if (t == "NFC") {
    impl->nfc = true;
    return;
  }
  if (t == "Sequence" && n.HasMember("normalizers") && n["normalizers"].IsArray()) {
    for (const auto& s : n["normalizers"].GetArray()) {
      if (type_of(s) != "NFC")
        refuse(origin, "normalizer.normalizers[]", "normalizer `" + type_of(s) + "` is not supported (only NFC)",
               kUnsupportedHint);
      impl->nfc = true;
    }
    return;
  }
  refuse(origin, "normalizer", "normalizer `" + t + "` is not supported (only NFC or none)", kUnsupportedHint);
}

void check_byte_level(const rapidjson::Value& b, const std::string& origin, const std::string& path) {
  if (get_bool(b, "add_prefix_space", false, origin, path))
    refuse(origin, path + ".add_prefix_space", "add_prefix_space=true is not supported",
           "Qwen and GPT-2 style tokenizers use false; set it to false only if that is what your model was trained with");
}

void load_pre_tokenizer(const rapidjson::Value& p, const std::string& origin, Tokenizer::Impl* impl) {
  std::string t = type_of(p);
  if (t == "ByteLevel") {
    check_byte_level(p, origin, "pre_tokenizer");
    if (get_bool(p, "use_regex", true, origin, "pre_tokenizer"))
      impl->splitter = std::make_unique<RegexSplitter>(kGpt2Pattern, origin + ": pre_tokenizer");
    return;
  }
  if (t == "Sequence" && p.HasMember("pretokenizers") && p["pretokenizers"].IsArray()) {
    const auto& seq = p["pretokenizers"];
    bool ok = seq.Size() == 2 && type_of(seq[0]) == "Split" && type_of(seq[1]) == "ByteLevel";
    if (!ok)
      refuse(origin, "pre_tokenizer", "only Sequence[Split, ByteLevel] or ByteLevel is supported",
             kUnsupportedHint);
    const auto& split = seq[0];
    const std::string sp = "pre_tokenizer.pretokenizers[0]";
    if (!split.HasMember("pattern") || !split["pattern"].IsObject() || !split["pattern"].HasMember("Regex") ||
        !split["pattern"]["Regex"].IsString())
      refuse(origin, sp + ".pattern", "only {\"Regex\": ...} patterns are supported", kUnsupportedHint);
    std::string behavior = split.HasMember("behavior") && split["behavior"].IsString() ? split["behavior"].GetString() : "";
    if (behavior != "Isolated")
      refuse(origin, sp + ".behavior", "behavior `" + behavior + "` is not supported (only Isolated)", kUnsupportedHint);
    if (get_bool(split, "invert", false, origin, sp))
      refuse(origin, sp + ".invert", "invert=true is not supported", kUnsupportedHint);
    check_byte_level(seq[1], origin, "pre_tokenizer.pretokenizers[1]");
    if (get_bool(seq[1], "use_regex", true, origin, "pre_tokenizer.pretokenizers[1]"))
      refuse(origin, "pre_tokenizer.pretokenizers[1].use_regex",
             "ByteLevel with use_regex=true after a Split is not supported", kUnsupportedHint);
    impl->splitter = std::make_unique<RegexSplitter>(split["pattern"]["Regex"].GetString(), origin + ": " + sp);
    return;
  }
  refuse(origin, "pre_tokenizer", "pre-tokenizer `" + (t.empty() ? std::string("null") : t) + "` is not supported",
         kUnsupportedHint);
}

void load_model(const rapidjson::Value& m, const std::string& origin, Tokenizer::Impl* impl) {
  if (!m.IsObject()) refuse(origin, "model", "missing or not an object", "a tokenizer.json needs a model");
  std::string t = type_of(m);
  if (!t.empty() && t != "BPE")
    refuse(origin, "model.type", "model `" + t + "` is not supported (only BPE)", kUnsupportedHint);
  if (m.HasMember("dropout") && !m["dropout"].IsNull() && !(m["dropout"].IsNumber() && m["dropout"].GetDouble() == 0))
    refuse(origin, "model.dropout", "BPE dropout is not supported", "set \"dropout\": null");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.HasMember(k) && !m[k].IsNull() && !(m[k].IsString() && m[k].GetStringLength() == 0))
      refuse(origin, std::string("model.") + k, "a non-empty value is not supported", kUnsupportedHint);
  if (get_bool(m, "byte_fallback", false, origin, "model"))
    refuse(origin, "model.byte_fallback", "byte_fallback is not supported (byte-level BPE needs none)", kUnsupportedHint);
  BpeModel& bpe = impl->bpe;
  bpe.fuse_unk = get_bool(m, "fuse_unk", false, origin, "model");
  bpe.ignore_merges = get_bool(m, "ignore_merges", false, origin, "model");

  if (!m.HasMember("vocab") || !m["vocab"].IsObject())
    refuse(origin, "model.vocab", "missing or not an object", "a BPE model needs {\"token\": id, ...}");
  const auto& vocab = m["vocab"];
  bpe.vocab.reserve(vocab.MemberCount());
  TokenId max_id = -1;
  for (auto it = vocab.MemberBegin(); it != vocab.MemberEnd(); ++it) {
    if (!it->value.IsInt() || it->value.GetInt() < 0)
      refuse(origin, std::string("model.vocab[\"") + it->name.GetString() + "\"]", "id must be a non-negative integer",
             "fix the file");
    TokenId id = it->value.GetInt();
    // Ids index dense tables; a real vocabulary has no large holes (found by fuzz_tokenizer_load).
    if (static_cast<size_t>(id) >= vocab.MemberCount() + (1u << 20))
      refuse(origin, std::string("model.vocab[\"") + it->name.GetString() + "\"]",
             "id " + std::to_string(id) + " is far beyond the " + std::to_string(vocab.MemberCount()) +
                 " entries of the vocabulary",
             "ids of a BPE vocabulary are 0..N-1; fix the file");
    bpe.vocab[std::string(it->name.GetString(), it->name.GetStringLength())] = id;
    max_id = std::max(max_id, id);
  }
  bpe.id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [tok, id] : bpe.vocab) bpe.id_to_token[static_cast<size_t>(id)] = tok;

  if (m.HasMember("unk_token") && m["unk_token"].IsString()) {
    auto it = bpe.vocab.find(m["unk_token"].GetString());
    if (it == bpe.vocab.end())
      refuse(origin, "model.unk_token", std::string("`") + m["unk_token"].GetString() + "` is not in model.vocab",
             "fix the file");
    bpe.unk = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    unicode::append(&ch, unicode::byte_to_cp(static_cast<uint8_t>(b)));
    auto it = bpe.vocab.find(ch);
    bpe.byte_id[b] = it == bpe.vocab.end() ? kNoToken : it->second;
  }

  if (!m.HasMember("merges") || !m["merges"].IsArray())
    refuse(origin, "model.merges", "missing or not an array", "a BPE model needs merges (may be empty)");
  const auto& merges = m["merges"];
  bpe.merges.reserve(merges.Size());
  for (rapidjson::SizeType r = 0; r < merges.Size(); ++r) {
    const auto& e = merges[r];
    std::string a, b;
    const std::string where = "model.merges[" + std::to_string(r) + "]";
    if (e.IsString()) {
      std::string s(e.GetString(), e.GetStringLength());
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        refuse(origin, where, "`" + s + "` is not two tokens separated by one space", "fix the file");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.IsArray() && e.Size() == 2 && e[0].IsString() && e[1].IsString()) {
      a.assign(e[0].GetString(), e[0].GetStringLength());
      b.assign(e[1].GetString(), e[1].GetStringLength());
    } else {
      refuse(origin, where, "expected \"a b\" or [\"a\", \"b\"]", "fix the file");
    }
    auto ia = bpe.vocab.find(a), ib = bpe.vocab.find(b), iab = bpe.vocab.find(a + b);
    if (ia == bpe.vocab.end() || ib == bpe.vocab.end() || iab == bpe.vocab.end())
      refuse(origin, where, "`" + a + "`, `" + b + "` or their merge `" + a + b + "` is not in model.vocab",
             "HF refuses this file too; fix the merges or the vocabulary");
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) | static_cast<uint32_t>(ib->second);
    // HF keeps the first rank of a duplicated merge.
    bpe.merges.emplace(key, (static_cast<uint64_t>(r) << 32) | static_cast<uint32_t>(iab->second));
  }
}

void load_added_tokens(const rapidjson::Value& arr, const std::string& origin, Tokenizer::Impl* impl) {
  if (arr.IsNull()) return;
  if (!arr.IsArray()) refuse(origin, "added_tokens", "expected an array", "fix the file");
  TokenId max_added = -1;
  for (rapidjson::SizeType i = 0; i < arr.Size(); ++i) {
    const auto& t = arr[i];
    const std::string where = "added_tokens[" + std::to_string(i) + "]";
    if (!t.IsObject() || !t.HasMember("id") || !t["id"].IsInt() || t["id"].GetInt() < 0 || !t.HasMember("content") ||
        !t["content"].IsString())
      refuse(origin, where, "expected {\"id\": int, \"content\": string, ...}", "fix the file");
    AddedToken a;
    a.id = t["id"].GetInt();
    a.content.assign(t["content"].GetString(), t["content"].GetStringLength());
    a.special = get_bool(t, "special", false, origin, where);
    a.lstrip = get_bool(t, "lstrip", false, origin, where);
    a.rstrip = get_bool(t, "rstrip", false, origin, where);
    a.single_word = get_bool(t, "single_word", false, origin, where);
    a.normalized = get_bool(t, "normalized", !a.special, origin, where);
    if (a.content.empty()) continue;  // HF ignores empty added tokens
    if (!unicode::is_valid_utf8(a.content)) refuse(origin, where + ".content", "not valid UTF-8", "fix the file");
    if (a.normalized && impl->nfc) a.content = unicode::nfc(a.content);  // HF stores it normalized
    // HF re-adds the tokens in order, ignoring the ids in the file: a content already known keeps its
    // id (added tokens first, then the model's vocabulary), a new one takes the next free id. For a
    // consistent file (every HF-saved one) these are the file's ids.
    auto known = impl->added_by_content.find(a.content);
    if (known != impl->added_by_content.end()) {
      a.id = impl->added[static_cast<size_t>(known->second)].id;
    } else if (auto v = impl->bpe.vocab.find(a.content); v != impl->bpe.vocab.end()) {
      a.id = v->second;
    } else {
      TokenId model_size = static_cast<TokenId>(impl->bpe.vocab.size());
      a.id = max_added < 0 ? model_size : (max_added >= model_size || model_size == 0 ? max_added + 1 : model_size);
    }
    max_added = std::max(max_added, a.id);
    impl->added_by_content[a.content] = static_cast<int>(impl->added.size());
    impl->added.push_back(a);
  }
  // HF matches special tokens first, then the others, each in file order; LeftmostLongest makes the
  // order matter only between identical contents, which cannot happen here.
  std::vector<std::pair<std::string, int>> raw, norm;
  for (size_t i = 0; i < impl->added.size(); ++i) {
    const AddedToken& a = impl->added[i];
    impl->added_by_id[a.id] = static_cast<int>(i);  // a later token with the same id wins, as in HF
    if (a.normalized) {
      norm.emplace_back(a.content, static_cast<int>(i));
    } else {
      raw.emplace_back(a.content, static_cast<int>(i));
    }
  }
  impl->raw_matcher.build(std::move(raw));
  impl->normalized_matcher.build(std::move(norm));
}

void check_decoder_and_post(const rapidjson::Document& d, const std::string& origin) {
  if (!d.HasMember("decoder") || type_of(d["decoder"]) != "ByteLevel")
    refuse(origin, "decoder", "only the ByteLevel decoder is supported", kUnsupportedHint);
  if (d.HasMember("post_processor") && !d["post_processor"].IsNull() && type_of(d["post_processor"]) != "ByteLevel")
    refuse(origin, "post_processor",
           "post-processor `" + type_of(d["post_processor"]) + "` is not supported (only ByteLevel or null)",
           "ptk adds special tokens through chat rendering, not a post-processor");
  for (const char* k : {"truncation", "padding"})
    if (d.HasMember(k) && !d[k].IsNull())
      refuse(origin, k, "must be null", std::string("ptk truncates and pads itself (data.max_seq_len); set \"") + k +
                                            "\": null");
  static const char* kKnown[] = {"version", "truncation", "padding", "added_tokens", "normalizer",
                                 "pre_tokenizer", "post_processor", "decoder", "model"};
  for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
    bool known = false;
    for (const char* k : kKnown) known = known || std::strcmp(k, it->name.GetString()) == 0;
    if (!known) refuse(origin, it->name.GetString(), "unknown key", kUnsupportedHint);
  }
}

}  // namespace

// HF's ByteLevel decoder for one token: its characters mapped back to bytes when all are in the
// byte alphabet, else the token's own UTF-8.
static std::string byte_level_bytes(const std::string& tok) {
  std::string bytes;
  size_t i = 0;
  uint32_t cp;
  while (i < tok.size()) {
    size_t n = unicode::decode(tok, i, &cp);
    int b = n ? unicode::cp_to_byte(cp) : -1;
    if (b < 0) return tok;
    bytes.push_back(static_cast<char>(b));
    i += n;
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// AddedMatcher

void AddedMatcher::build(std::vector<std::pair<std::string, int>> patterns) {
  std::stable_sort(patterns.begin(), patterns.end(), [](const auto& x, const auto& y) {
    unsigned char a = static_cast<unsigned char>(x.first[0]), b = static_cast<unsigned char>(y.first[0]);
    return a != b ? a < b : x.first.size() > y.first.size();
  });
  patterns_ = std::move(patterns);
  std::memset(first_, 0, sizeof first_);
  distinct_first_ = 0;
  for (size_t i = 0; i < patterns_.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(patterns_[i].first[0]);
    if (first_[c][1] == 0) {
      first_[c][0] = static_cast<uint16_t>(i);
      ++distinct_first_;
      only_first_ = c;
    }
    first_[c][1] = static_cast<uint16_t>(i + 1);
  }
}

bool AddedMatcher::find(std::string_view text, size_t from, size_t* b, size_t* e, int* which) const {
  if (patterns_.empty()) return false;
  const char* p = text.data();
  size_t n = text.size();
  for (size_t pos = from; pos < n; ++pos) {
    if (distinct_first_ == 1) {
      const void* hit = std::memchr(p + pos, only_first_, n - pos);
      if (!hit) return false;
      pos = static_cast<size_t>(static_cast<const char*>(hit) - p);
    }
    unsigned char c = static_cast<unsigned char>(p[pos]);
    for (uint16_t k = first_[c][0]; k < first_[c][1]; ++k) {
      const std::string& pat = patterns_[k].first;
      if (pat.size() <= n - pos && std::memcmp(p + pos, pat.data(), pat.size()) == 0) {
        *b = pos;
        *e = pos + pat.size();
        *which = patterns_[k].second;
        return true;
      }
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Encoding

namespace {

// Start of the code point ending at s[i-1].
size_t prev_char_start(std::string_view s, size_t i) {
  size_t j = i - 1;
  while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
  return j;
}

// HF AddedVocabulary::find_matches: splits `s` into added tokens (with lstrip/rstrip/single_word)
// and gaps. on_gap(b, e); on_token(index into added, b, e).
template <class Gap, class Tok>
void split_added(const Tokenizer::Impl& im, const AddedMatcher& m, std::string_view s, Gap&& on_gap, Tok&& on_token) {
  size_t start_offset = 0, pos = 0, mb, me;
  int which;
  uint32_t cp;
  while (m.find(s, pos, &mb, &me, &which)) {
    pos = me;
    const AddedToken& tok = im.added[static_cast<size_t>(which)];
    size_t start = mb, stop = me;
    if (tok.single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        unicode::decode(s, prev_char_start(s, start), &cp);
        start_space = !unicode::is_word_char(cp);
      }
      if (stop < s.size()) {
        unicode::decode(s, stop, &cp);
        stop_space = !unicode::is_word_char(cp);
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t j = prev_char_start(s, ns);
        unicode::decode(s, j, &cp);
        if (!unicode::is_whitespace(cp)) break;
        ns = j;
      }
      start = std::max(ns, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        size_t n = unicode::decode(s, stop, &cp);
        if (!unicode::is_whitespace(cp)) break;
        stop += n;
      }
    }
    if (start_offset < start) on_gap(start_offset, start);
    on_token(which, start, stop);
    start_offset = stop;
  }
  if (start_offset < s.size()) on_gap(start_offset, s.size());
}

}  // namespace

void Tokenizer::Impl::encode_plain(std::string_view piece, uint32_t base, std::vector<TokenId>* ids,
                                   std::vector<uint32_t>* starts, Tail* tail) const {
  auto word = [&](size_t b, size_t e) {
    size_t before = ids->size();
    if (tail) {
      encode_word_tail(piece.substr(b, e - b), ids, tail);  // drops ids only without starts
    } else {
      bpe.encode_word(piece.substr(b, e - b), uid, ids);
    }
    if (starts) {
      uint32_t at = base + static_cast<uint32_t>(b);
      for (size_t k = before; k < ids->size(); ++k) {
        starts->push_back(std::min(at, base + static_cast<uint32_t>(e - 1)));
        at += bpe.id_len[static_cast<size_t>((*ids)[k])];
      }
    }
  };
  if (splitter) {
    splitter->split(piece, word);
  } else if (!piece.empty()) {
    word(0, piece.size());
  }
}

void Tokenizer::Impl::encode_word_tail(std::string_view word, std::vector<TokenId>* ids, Tail* tail) const {
  size_t pos = 0;
  if (ids_bounded) {
    // Merge a window, keep its ids up to `margin` bytes before the window's end (the merges there
    // may depend on bytes past the window), and start the next window at that id boundary: BPE of
    // the rest of a word from one of its final id boundaries gives the word's remaining ids (no
    // merge crosses the boundary, and the merges on its right keep their order).
    std::vector<TokenId> part;
    while (word.size() - pos > tail->window) {
      part.clear();
      bpe.encode_word(word.substr(pos, tail->window), uid, &part);
      const size_t open_from = pos + tail->window - tail->margin;
      size_t at = pos, k = 0;
      while (k < part.size() && at + bpe.id_len[static_cast<size_t>(part[k])] <= open_from)
        at += bpe.id_len[static_cast<size_t>(part[k++])];
      ids->insert(ids->end(), part.begin(), part.begin() + static_cast<std::ptrdiff_t>(k));
      pos = at;  // window > margin + longest id, so at least one id was kept
      tail->trim(ids);
    }
  }
  bpe.encode_word(word.substr(pos), uid, ids);
  tail->trim(ids);
}

void Tokenizer::Impl::encode_normalized(std::string_view piece, uint32_t base, std::vector<TokenId>* ids,
                                        std::vector<uint32_t>* starts, Tail* tail, uint32_t cut) const {
  std::string normalized;
  std::string_view s = piece;
  // (normalized offset, original offset) at each line start when NFC changed the piece, and at
  // `cut` inside its line (encode_prompt_completion's boundary: a completion token on the prompt's
  // last line must not take the line's start, before the boundary).
  std::vector<std::pair<uint32_t, uint32_t>> line_map;
  if (nfc && !unicode::nfc_quick_yes(piece)) {
    const size_t split = cut >= base && cut - base < piece.size() ? cut - base : std::string_view::npos;
    // NFC never composes across '\n' (a starter with no compositions), so lines normalize alone.
    size_t b = 0;
    while (b < piece.size()) {
      size_t e = piece.find('\n', b);
      e = e == std::string_view::npos ? piece.size() : e + 1;
      line_map.emplace_back(static_cast<uint32_t>(normalized.size()), static_cast<uint32_t>(b));
      std::string line = unicode::nfc_slow(piece.substr(b, e - b));
      if (split != std::string_view::npos && split > b && split < e) {
        // Split at the cut where the halves normalize to the same text (NFC composes nothing across
        // it; a completion starting with a combining mark composes with the prompt's end: no split).
        std::string head = unicode::nfc_slow(piece.substr(b, split - b));
        if (line.compare(0, head.size(), head) == 0 && line.compare(head.size(), std::string::npos,
                                                                    unicode::nfc_slow(piece.substr(split, e - split))) == 0)
          line_map.emplace_back(static_cast<uint32_t>(normalized.size() + head.size()), static_cast<uint32_t>(split));
      }
      normalized += line;
      b = e;
    }
    s = normalized;
  }
  std::vector<uint32_t> local;
  std::vector<uint32_t>* st = starts ? (line_map.empty() ? starts : &local) : nullptr;
  uint32_t sbase = line_map.empty() ? base : 0;
  if (normalized_matcher.empty()) {
    encode_plain(s, sbase, ids, st, tail);
  } else {
    split_added(
        *this, normalized_matcher, s,
        [&](size_t b, size_t e) { encode_plain(s.substr(b, e - b), sbase + static_cast<uint32_t>(b), ids, st, tail); },
        [&](int which, size_t b, size_t) {
          ids->push_back(added[static_cast<size_t>(which)].id);
          if (st) st->push_back(sbase + static_cast<uint32_t>(b));
          if (tail) tail->trim(ids);
        });
  }
  if (starts && !line_map.empty()) {
    for (uint32_t off : local) {
      auto it = std::upper_bound(line_map.begin(), line_map.end(), std::make_pair(off, UINT32_MAX));
      --it;
      starts->push_back(base + it->second);
    }
  }
}

void Tokenizer::Impl::encode_into(std::string_view text, std::vector<TokenId>* ids, std::vector<uint32_t>* starts,
                                  Tail* tail, uint32_t cut) const {
  if (raw_matcher.empty()) {
    encode_normalized(text, 0, ids, starts, tail, cut);
    return;
  }
  split_added(
      *this, raw_matcher, text,
      [&](size_t b, size_t e) {
        encode_normalized(text.substr(b, e - b), static_cast<uint32_t>(b), ids, starts, tail, cut);
      },
      [&](int which, size_t b, size_t) {
        ids->push_back(added[static_cast<size_t>(which)].id);
        if (starts) starts->push_back(static_cast<uint32_t>(b));
        if (tail) tail->trim(ids);
      });
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view config_json, const std::string& origin,
                               LoadOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->uid = g_next_uid.fetch_add(1);
  rapidjson::Document d = json::parse(tokenizer_json, origin);
  if (!d.IsObject()) refuse(origin, "(top level)", "expected a JSON object", "is this a tokenizer.json?");
  check_decoder_and_post(d, origin);
  static const rapidjson::Value kNull;
  load_normalizer(d.HasMember("normalizer") ? d["normalizer"] : kNull, origin, impl.get());
  if (!d.HasMember("pre_tokenizer")) refuse(origin, "pre_tokenizer", "missing", kUnsupportedHint);
  load_pre_tokenizer(d["pre_tokenizer"], origin, impl.get());
  if (!d.HasMember("model")) refuse(origin, "model", "missing", kUnsupportedHint);
  load_model(d["model"], origin, impl.get());
  if (d.HasMember("added_tokens")) load_added_tokens(d["added_tokens"], origin, impl.get());

  // Bytes each id decodes to (HF ByteLevel decoder: a token whose characters are not all in the
  // byte alphabet decodes to its own UTF-8).
  BpeModel& bpe = impl->bpe;
  bpe.id_bytes.resize(bpe.id_to_token.size());
  for (size_t id = 0; id < bpe.id_to_token.size(); ++id) bpe.id_bytes[id] = byte_level_bytes(bpe.id_to_token[id]);
  bpe.id_len.resize(bpe.id_bytes.size());
  for (size_t id = 0; id < bpe.id_bytes.size(); ++id) bpe.id_len[id] = static_cast<uint32_t>(bpe.id_bytes[id].size());
  for (auto& a : impl->added) a.bytes = byte_level_bytes(a.content);
  size_t max_id = bpe.id_to_token.size();
  for (const auto& a : impl->added) max_id = std::max(max_id, static_cast<size_t>(a.id) + 1);
  impl->vocab_size = max_id;
  // What bounds the bytes behind n ids (head_bytes): every byte has an id of its own (no byte is
  // dropped or fused into an unk), and no added token strips whitespace around itself.
  impl->ids_bounded = true;
  for (int b = 0; b < 256; ++b) impl->ids_bounded = impl->ids_bounded && bpe.byte_id[b] != kNoToken;
  for (const auto& a : impl->added) {
    impl->ids_bounded = impl->ids_bounded && !a.lstrip && !a.rstrip;
    impl->longest_bytes = std::max(impl->longest_bytes, a.content.size());
  }
  for (uint32_t len : bpe.id_len) impl->longest_bytes = std::max<size_t>(impl->longest_bytes, len);

  Tokenizer t(std::move(impl));
  Impl* im = t.impl_.get();
  rapidjson::Document cfg;
  std::string cfg_origin = origin + " (tokenizer_config.json)";
  bool have_cfg = !config_json.empty();
  if (have_cfg) {
    cfg = json::parse(config_json, cfg_origin);
    if (!cfg.IsObject()) refuse(cfg_origin, "(top level)", "expected a JSON object", "fix the file");
  }
  auto id_of = [&](const std::string& s) { return s.empty() ? kNoToken : t.token_to_id(s); };
  im->im_start = id_of("<|im_start|>");
  im->im_end = id_of("<|im_end|>");
  TokenId eot = id_of("<|endoftext|>");
  im->eos = have_cfg && !token_text(cfg, "eos_token").empty() ? id_of(token_text(cfg, "eos_token")) : eot;
  im->pad = have_cfg && !token_text(cfg, "pad_token").empty() ? id_of(token_text(cfg, "pad_token")) : eot;

  resolve_chat_template(im, options, folder_templates(have_cfg ? &cfg : nullptr, cfg_origin, nullptr, ""));
  return t;
}

Tokenizer Tokenizer::load(const std::string& path, LoadOptions options) {
  std::string json_path = path, dir;
  if (path_exists(path + "/tokenizer.json")) {
    json_path = path + "/tokenizer.json";
    dir = path;
  } else {
    dir = parent_dir(path);
  }
  if (!path_exists(json_path) || std::filesystem::is_directory(json_path))  // a folder was read as "" before
    throw Error("tokenizer: " + path + " is neither a tokenizer.json nor a folder holding one\n---> HINT: point " +
                "tokenizer.path (or --tokenizer) at an HF model folder; scripts/setup.sh places Qwen's files in "
                "assets/tokenizers/qwen/");
  std::string cfg_path = dir + "/tokenizer_config.json";
  std::string cfg = path_exists(cfg_path) ? read_file(cfg_path) : std::string();
  // The folder's chat_template.jinja (transformers 5 saves the template there) and error messages
  // that name the config file: the chat template is resolved again with them (from_json knows
  // neither).
  std::string jinja_path = dir + "/chat_template.jinja", jinja;
  bool have_jinja = path_exists(jinja_path) && !std::filesystem::is_directory(jinja_path);
  if (have_jinja) jinja = read_file(jinja_path);
  Tokenizer t = from_json(read_file(json_path), cfg, json_path, LoadOptions());  // the options are resolved below
  rapidjson::Document d;
  if (!cfg.empty()) d = json::parse(cfg, cfg_path);
  resolve_chat_template(t.impl_.get(), options,
                        folder_templates(cfg.empty() ? nullptr : &d, cfg_path, have_jinja ? &jinja : nullptr, jinja_path));
  return t;
}

std::vector<TokenId> Tokenizer::encode(std::string_view text) const {
  std::vector<TokenId> ids;
  ids.reserve(text.size() / 3 + 4);
  if (unicode::is_valid_utf8(text)) {
    impl_->encode_into(text, &ids, nullptr);
  } else {
    std::string fixed = unicode::to_valid_utf8(text);
    impl_->encode_into(fixed, &ids, nullptr);
  }
  return ids;
}

size_t Tokenizer::longest_token_bytes() const { return impl_->longest_bytes; }

size_t Tokenizer::head_bytes(size_t n) const {
  if (!impl_->ids_bounded) return SIZE_MAX;
  const size_t per_id = 3 * impl_->longest_bytes;  // NFC makes text at most 3x shorter
  if (n > (SIZE_MAX / per_id) - kHeadMarginIds) return SIZE_MAX;
  return (n + kHeadMarginIds) * per_id;
}

namespace {
// Valid UTF-8 of `text` (a copy only when it is not), encoded through `tail`.
std::vector<TokenId> encode_bounded(const Tokenizer::Impl& im, std::string_view text, Tokenizer::Impl::Tail* tail) {
  std::vector<TokenId> ids;
  ids.reserve(std::min(text.size() / 3, tail->keep == SIZE_MAX ? text.size() : 2 * tail->keep + 4096) + 4);
  if (unicode::is_valid_utf8(text)) {
    im.encode_into(text, &ids, nullptr, tail);
  } else {
    std::string fixed = unicode::to_valid_utf8(text);
    im.encode_into(fixed, &ids, nullptr, tail);
  }
  return ids;
}
}  // namespace

std::vector<TokenId> Tokenizer::encode_head(std::string_view text, size_t n) const {
  Impl::Tail whole = impl_->bounded();  // keeps every id; only windows a huge pre-token
  std::vector<TokenId> ids = encode_bounded(*impl_, utf8_head(text, head_bytes(n)), &whole);
  if (ids.size() > n) ids.resize(n);
  return ids;
}

std::vector<TokenId> Tokenizer::encode_tail(std::string_view text, size_t n, size_t* total) const {
  Impl::Tail tail = impl_->bounded(n);
  std::vector<TokenId> ids = encode_bounded(*impl_, text, &tail);
  if (total) *total = tail.dropped + ids.size();
  if (ids.size() > n) ids.erase(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(n));
  return ids;
}

std::string_view utf8_head(std::string_view s, size_t bytes) {
  if (bytes >= s.size()) return s;
  size_t end = bytes;
  while (end < s.size() && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) ++end;  // continuation bytes
  return s.substr(0, end);
}

std::vector<std::vector<TokenId>> Tokenizer::encode_batch(const std::vector<std::string>& texts, int threads) const {
  std::vector<std::vector<TokenId>> out(texts.size());
  size_t total = 0;
  for (const auto& s : texts) total += s.size();
  int n = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n = static_cast<int>(std::min<size_t>(static_cast<size_t>(n), texts.size()));
  if (n <= 1 || total < (64u << 10)) {
    for (size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i]);
    return out;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
  constexpr size_t kBlock = 16;
  auto work = [&] {
    try {
      for (;;) {
        size_t b = next.fetch_add(kBlock);
        if (b >= texts.size()) return;
        size_t e = std::min(texts.size(), b + kBlock);
        for (size_t i = b; i < e; ++i) out[i] = encode(texts[i]);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
      next.store(texts.size());
    }
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < n; ++i) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return out;
}

std::string Tokenizer::decode(const std::vector<TokenId>& ids, bool skip_special) const {
  // HF: every token (added ones as their content) goes through the ByteLevel decoder, which maps
  // each token's characters back to bytes; the bytes are then decoded lossily once.
  const Impl& im = *impl_;
  std::string bytes;
  for (TokenId id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= im.vocab_size)
      throw Error("tokenizer: cannot decode id " + std::to_string(id) + ": the vocabulary has ids 0.." +
                  std::to_string(im.vocab_size - 1) + "\n---> HINT: were these ids made with another tokenizer?");
    auto a = im.added_by_id.find(id);
    if (a != im.added_by_id.end()) {
      const AddedToken& tok = im.added[static_cast<size_t>(a->second)];
      if (!(skip_special && tok.special)) bytes += tok.bytes;
    } else if (static_cast<size_t>(id) < im.bpe.id_bytes.size()) {
      bytes += im.bpe.id_bytes[static_cast<size_t>(id)];
    }
  }
  return unicode::to_valid_utf8(bytes);
}

size_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

TokenId Tokenizer::token_to_id(std::string_view token) const {
  auto a = impl_->added_by_content.find(std::string(token));
  if (a != impl_->added_by_content.end()) return impl_->added[static_cast<size_t>(a->second)].id;
  auto v = impl_->bpe.vocab.find(absl::string_view(token.data(), token.size()));
  return v == impl_->bpe.vocab.end() ? kNoToken : v->second;
}

std::string Tokenizer::id_to_token(TokenId id) const {
  auto a = impl_->added_by_id.find(id);
  if (a != impl_->added_by_id.end()) return impl_->added[static_cast<size_t>(a->second)].content;
  if (id >= 0 && static_cast<size_t>(id) < impl_->bpe.id_to_token.size()) return impl_->bpe.id_to_token[static_cast<size_t>(id)];
  return "";
}

bool Tokenizer::is_special(TokenId id) const {
  auto a = impl_->added_by_id.find(id);
  return a != impl_->added_by_id.end() && impl_->added[static_cast<size_t>(a->second)].special;
}

TokenId Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::ends_with_eos(std::string_view text) const {
  if (impl_->eos == kNoToken) return false;
  const std::string eos = id_to_token(impl_->eos);
  return !eos.empty() && text.size() >= eos.size() && text.substr(text.size() - eos.size()) == eos;
}
TokenId Tokenizer::pad_id() const { return impl_->pad; }
TokenId Tokenizer::im_start_id() const { return impl_->im_start; }
TokenId Tokenizer::im_end_id() const { return impl_->im_end; }

PromptCompletionEncoding Tokenizer::encode_prompt_completion(std::string_view prompt, std::string_view completion,
                                                             bool add_eos, size_t max_ids) const {
  Impl::Tail whole = impl_->bounded();  // a huge pre-token merged a window at a time
  Impl::Tail* bounded = nullptr;
  // TRL appends the EOS only to a completion that does not already end with the EOS token's text.
  if (add_eos && ends_with_eos(completion)) add_eos = false;
  if (max_ids != SIZE_MAX) {
    bounded = &whole;
    // prompt + completion cut to head_bytes(max_ids); a cut prompt leaves no completion.
    const size_t budget = head_bytes(max_ids);
    std::string_view p = utf8_head(prompt, budget);
    completion = p.size() < prompt.size() ? std::string_view() : utf8_head(completion, budget - p.size());
    prompt = p;
  }
  std::string text = unicode::to_valid_utf8(prompt);
  uint32_t boundary = static_cast<uint32_t>(text.size());
  text += unicode::to_valid_utf8(completion);
  PromptCompletionEncoding r;
  std::vector<uint32_t> starts;
  impl_->encode_into(text, &r.ids, &starts, bounded, boundary);
  r.completion_mask.resize(r.ids.size());
  r.prompt_tokens = r.ids.size();
  for (size_t i = 0; i < r.ids.size(); ++i) {
    r.completion_mask[i] = starts[i] >= boundary;
    if (r.completion_mask[i] && r.prompt_tokens == r.ids.size()) r.prompt_tokens = i;
  }
  if (add_eos) {
    if (impl_->eos == kNoToken)
      throw Error("tokenizer: add_eos asked but this tokenizer has no EOS token\n---> HINT: set eos_token in "
                  "tokenizer_config.json");
    r.ids.push_back(impl_->eos);
    r.completion_mask.push_back(1);
  }
  if (r.ids.size() > max_ids) {
    r.ids.resize(max_ids);
    r.completion_mask.resize(max_ids);
    r.prompt_tokens = std::min(r.prompt_tokens, max_ids);
  }
  return r;
}

bool is_valid_utf8(std::string_view s) { return unicode::is_valid_utf8(s); }
std::string to_valid_utf8(std::string_view s) { return unicode::to_valid_utf8(s); }
std::string nfc(std::string_view s) { return unicode::nfc(s); }

}  // namespace ptk::tokenizer
