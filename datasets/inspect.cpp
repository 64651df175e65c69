#include "datasets/inspect.h"

#include <algorithm>
#include <ostream>
#include <vector>

#include "core/util/json.h"

namespace ptk::data {

namespace {

using tokenizer::TokenId;

constexpr const char* kGreen = "\x1b[1;32m";
constexpr const char* kDim = "\x1b[2m";
constexpr const char* kReset = "\x1b[0m";

struct Marker {
  const tokenizer::Tokenizer& tok;
  const InspectOptions& o;
  std::ostream& out;

  std::string decode(const std::vector<TokenId>& ids) const {
    if (!o.tokens) return tok.decode(ids);
    std::string s;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) s += kTokenSeparator;
      s += tok.decode({ids[i]});
    }
    return s;
  }
  // `ids` with trained[i] marking targets; spans of equal kind decoded together.
  void text(const Span<uint32_t>& ids, const std::vector<uint8_t>& trained) const {
    size_t i = 0;
    while (i < ids.size) {
      size_t j = i;
      std::vector<TokenId> span;
      while (j < ids.size && trained[j] == trained[i]) span.push_back(static_cast<TokenId>(ids[j++]));
      if (i > 0 && o.tokens) out << (o.color ? std::string(kDim) + kTokenSeparator + kReset : std::string(kTokenSeparator));
      const std::string s = decode(span);
      if (!trained[i]) {
        out << s;
      } else if (o.color) {
        out << kGreen << s << kReset;
      } else {
        out << kTrainedOpen << s << kTrainedClose;
      }
      i = j;
    }
    out << "\n";
  }
};

int64_t count(const std::vector<uint8_t>& v) { return std::count(v.begin(), v.end(), uint8_t{1}); }

std::string plural(int64_t n, const char* one, const char* many) { return std::to_string(n) + " " + (n == 1 ? one : many); }

}  // namespace

std::string manifest_tokenizer_path(const PreparedSet& set) {
  rapidjson::Document m = json::parse(set.manifest(), set.dir() + "/manifest.json");
  return m.HasMember("tokenizer_path") && m["tokenizer_path"].IsString() ? m["tokenizer_path"].GetString() : "";
}

void inspect_rows(const PreparedSet& set, const tokenizer::Tokenizer& tok, const InspectOptions& o, std::ostream& out) {
  rapidjson::Document m = json::parse(set.manifest(), set.dir() + "/manifest.json");
  std::vector<std::string> sources;
  if (m.HasMember("per_source") && m["per_source"].IsArray())
    for (const auto& s : m["per_source"].GetArray())
      sources.push_back(s.HasMember("path") && s["path"].IsString() ? s["path"].GetString() : "?");
  auto where = [&](const DocEntry* e) {
    return (e->source < sources.size() ? sources[e->source] : "source " + std::to_string(e->source)) + ":" +
           std::to_string(e->line);
  };
  const Format f = set.format();
  const int64_t n = set.num_rows();
  const int64_t first = std::max<int64_t>(0, std::min(o.start, n));
  const int64_t last = std::min(n, first + std::max<int64_t>(0, o.rows));
  const bool pairs = f == Format::kPreference, prompts = f == Format::kRl;
  const std::string rows = pairs ? plural(n, "pair", "pairs") : prompts ? plural(n, "prompt", "prompts")
                           : set.packed()  ? plural(n, "packed row", "packed rows")
                                           : plural(n, "row", "rows");
  out << set.dir() << ": " << format_name(f) << ", " << rows << " (" << plural(set.num_docs(), "document", "documents")
      << "), max_seq_len " << set.max_seq_len() << "; ";
  if (last > first)
    out << "rows " << first << ".." << last - 1 << " shown, ";
  else
    out << "no row shown (--start " << o.start << ", --rows " << o.rows << "), ";
  if (f == Format::kRl)
    out << "prompts are never trained (GRPO trains the completions it samples)\n";
  else if (o.color)
    out << "trained tokens (loss mask 1) in " << kGreen << "green" << kReset << "\n";
  else
    out << "trained tokens (loss mask 1) between " << kTrainedOpen << " and " << kTrainedClose << "\n";
  Marker mk{tok, o, out};
  for (int64_t r = first; r < last; ++r) {
    const std::vector<uint32_t> docs = set.row_docs(r);
    if (f == Format::kSft) {
      int64_t tokens = 0, trained = 0;
      std::vector<std::vector<uint8_t>> marks;
      for (uint32_t d : docs) {
        DocView v = set.doc(d);
        std::vector<uint8_t> t(v.mask.begin(), v.mask.end());
        if (!t.empty()) t[0] = 0;  // nothing predicts a document's first token
        tokens += static_cast<int64_t>(v.ids.size);
        trained += count(t);
        marks.push_back(std::move(t));
      }
      out << "\n=== row " << r << ": " << plural(static_cast<int64_t>(docs.size()), "document", "documents") << ", "
          << tokens << " of " << set.max_seq_len() << " tokens, " << trained << " trained ===\n";
      for (size_t k = 0; k < docs.size(); ++k) {
        DocView v = set.doc(docs[k]);
        out << "--- document " << docs[k] << " (" << where(v.entry) << "): " << v.ids.size << " tokens, " << count(marks[k])
            << " trained";
        if (v.entry->seg_a > 0) out << "; prompt " << v.entry->seg_a << " tokens";
        out << " ---\n";
        mk.text(v.ids, marks[k]);
      }
    } else if (f == Format::kPreference) {
      DocView v = set.doc(docs[0]);
      const uint32_t a = v.entry->seg_a, b = v.entry->seg_b;
      const Span<uint32_t> prompt{v.ids.data, a}, chosen{v.ids.data + a, b},
          rejected{v.ids.data + a + b, v.ids.size - a - b};
      std::vector<uint8_t> mask(v.mask.begin(), v.mask.end());
      out << "\n=== pair " << r << " (" << where(v.entry) << "): prompt " << a << " tokens, chosen " << b
          << ", rejected " << rejected.size << " ===\n";
      out << "--- prompt (" << count(std::vector<uint8_t>(mask.begin(), mask.begin() + a)) << " trained) ---\n";
      mk.text(prompt, std::vector<uint8_t>(mask.begin(), mask.begin() + a));
      out << "--- chosen (" << count(std::vector<uint8_t>(mask.begin() + a, mask.begin() + a + b)) << " trained) ---\n";
      mk.text(chosen, std::vector<uint8_t>(mask.begin() + a, mask.begin() + a + b));
      out << "--- rejected (" << count(std::vector<uint8_t>(mask.begin() + a + b, mask.end())) << " trained) ---\n";
      mk.text(rejected, std::vector<uint8_t>(mask.begin() + a + b, mask.end()));
    } else {
      DocView v = set.doc(docs[0]);
      out << "\n=== prompt " << r << " (" << where(v.entry) << "): " << v.ids.size << " tokens ===\n";
      mk.text(v.ids, std::vector<uint8_t>(v.ids.size, 0));
      out << "--- record ---\n" << set.meta(docs[0]) << "\n";
    }
  }
  if (last < n) out << "\n(" << n - last << " more after these: --start " << last << " shows them)\n";
}

}  // namespace ptk::data
