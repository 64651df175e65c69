// Test helpers for SVG plots: a small XML well-formedness checker and a metrics.jsonl writer.
// Not a general XML parser (no DTD, CDATA or namespace checks).
#pragma once
#include <algorithm>
#include <map>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "core/train/metrics.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk::plot {

// A strict-enough XML well-formedness check: one root, balanced and properly nested tags, quoted
// attributes without duplicates, no raw '<' or stray '&' in text. Returns "" or what is wrong.
// Also counts elements by name into `counts`.
inline std::string xml_problem(const std::string& s, std::map<std::string, int>* counts) {
  std::vector<std::string> stack;
  int roots = 0;
  size_t i = 0;
  auto check_text = [&](size_t from, size_t to) -> std::string {
    for (size_t k = from; k < to; ++k) {
      if (s[k] == '&') {
        size_t semi = s.find(';', k);
        std::string ent = semi == std::string::npos ? "" : s.substr(k, semi - k + 1);
        if (ent != "&amp;" && ent != "&lt;" && ent != "&gt;" && ent != "&quot;" && ent != "&apos;")
          return "bad entity at " + std::to_string(k);
      }
    }
    return "";
  };
  while (i < s.size()) {
    size_t lt = s.find('<', i);
    if (lt == std::string::npos) lt = s.size();
    if (auto e = check_text(i, lt); !e.empty()) return e;
    if (lt > i && stack.empty() && s.find_first_not_of(" \n\t\r", i) < lt) return "text outside the root";
    if (lt == s.size()) break;
    if (s.compare(lt, 5, "<?xml") == 0) {
      if (lt != 0) return "xml declaration not first";
      i = s.find("?>", lt);
      if (i == std::string::npos) return "unterminated declaration";
      i += 2;
      continue;
    }
    if (s.compare(lt, 4, "<!--") == 0) {
      i = s.find("-->", lt);
      if (i == std::string::npos) return "unterminated comment";
      i += 3;
      continue;
    }
    size_t gt = lt + 1;
    char quote = 0;
    for (; gt < s.size(); ++gt) {
      if (quote) {
        if (s[gt] == quote) quote = 0;
        else if (s[gt] == '<') return "raw < in attribute at " + std::to_string(gt);
      } else if (s[gt] == '"' || s[gt] == '\'') {
        quote = s[gt];
      } else if (s[gt] == '>') {
        break;
      }
    }
    if (gt == s.size()) return "unterminated tag at " + std::to_string(lt);
    std::string tag = s.substr(lt + 1, gt - lt - 1);
    i = gt + 1;
    if (!tag.empty() && tag[0] == '/') {
      std::string name = tag.substr(1);
      if (stack.empty() || stack.back() != name)
        return "closing </" + name + "> does not match <" + (stack.empty() ? "" : stack.back()) + ">";
      stack.pop_back();
      continue;
    }
    bool self_closing = !tag.empty() && tag.back() == '/';
    if (self_closing) tag.pop_back();
    static const std::regex name_re("^[A-Za-z_][A-Za-z0-9_.:-]*");
    std::smatch m;
    if (!std::regex_search(tag, m, name_re)) return "bad tag name in <" + tag + ">";
    std::string name = m.str();
    std::string attrs = tag.substr(name.size());
    static const std::regex attr_re(R"(^\s+([A-Za-z_:][A-Za-z0-9_.:-]*)="([^"]*)\")");
    std::vector<std::string> seen;
    while (std::regex_search(attrs, m, attr_re)) {
      if (std::find(seen.begin(), seen.end(), m[1].str()) != seen.end()) return "duplicate attribute " + m[1].str();
      seen.push_back(m[1].str());
      if (auto e = check_text(0, 0); !e.empty()) return e;
      attrs = m.suffix();
    }
    if (attrs.find_first_not_of(" \n\t") != std::string::npos) return "bad attributes in <" + tag + ">: `" + attrs + "`";
    if (stack.empty()) ++roots;
    (*counts)[name]++;
    if (!self_closing) stack.push_back(name);
  }
  if (!stack.empty()) return "unclosed <" + stack.back() + ">";
  if (roots != 1) return std::to_string(roots) + " root elements";
  return "";
}

inline int count_of(const std::string& s, const std::string& needle) {
  int n = 0;
  for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + 1)) ++n;
  return n;
}

// Writes d/name/metrics.jsonl with loss (and lr) per step, then appends `tail` verbatim.
inline std::string write_run(const test::TempDir& d, const std::string& name, const std::vector<std::pair<int, double>>& loss,
                      const std::string& tail = "") {
  std::string dir = d.file(name);
  {
    MetricsWriter w(dir + "/metrics.jsonl");
    for (auto [step, v] : loss) w.write(step, Metrics().add("loss", v).add("lr", 1e-3 * step));
  }
  if (!tail.empty()) {
    std::string text = read_file(dir + "/metrics.jsonl") + tail;
    write_file_atomic(dir + "/metrics.jsonl", text);
  }
  return dir;
}

}  // namespace ptk::plot
