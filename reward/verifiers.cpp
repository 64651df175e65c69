// Rule verifiers (see verifiers.h for each one's documented behaviour). Hand-written scanners, no
// regex: they run once per rollout in GRPO, and the behaviour stays readable case by case.
#include "reward/verifiers.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>

#include "core/util/error.h"
#include "core/util/strings.h"  // nearest

namespace ptk::reward {
namespace {

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_space(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }
bool is_alpha(char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

void replace_all(std::string* s, std::string_view from, std::string_view to) {
  for (size_t pos = 0; (pos = s->find(from, pos)) != std::string::npos;) {
    s->replace(pos, from.size(), to);
    pos += to.size();
  }
}

// Removes `cmd` (e.g. "\left") where the next character is not a letter (so "\leftarrow" stays).
void remove_command(std::string* s, std::string_view cmd) {
  for (size_t pos = 0; (pos = s->find(cmd, pos)) != std::string::npos;) {
    size_t end = pos + cmd.size();
    if (end < s->size() && is_alpha((*s)[end])) {
      pos = end;
      continue;
    }
    s->erase(pos, cmd.size());
  }
}

// Index just past the `}` matching the `{` at `open`, skipping escaped `\{` `\}`; npos if unbalanced.
size_t match_brace(std::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '\\') {
      ++i;
    } else if (s[i] == '{') {
      ++depth;
    } else if (s[i] == '}' && --depth == 0) {
      return i + 1;
    }
  }
  return std::string::npos;
}

// Length of a number token at `pos` (0 if none): [-][$]digits[,ddd]*[.digits][/digits][%].
// Thousands commas only in groups of exactly three digits, so "1,2,3" scans as "1".
size_t scan_number(std::string_view s, size_t pos) {
  size_t i = pos;
  if (i < s.size() && s[i] == '-') ++i;
  if (i < s.size() && s[i] == '$') ++i;
  size_t digits_start = i;
  while (i < s.size() && is_digit(s[i])) ++i;
  if (i == digits_start) return 0;
  while (i + 3 < s.size() && s[i] == ',' && is_digit(s[i + 1]) && is_digit(s[i + 2]) && is_digit(s[i + 3]) &&
         (i + 4 >= s.size() || !is_digit(s[i + 4])))
    i += 4;
  if (i + 1 < s.size() && s[i] == '.' && is_digit(s[i + 1])) {
    ++i;
    while (i < s.size() && is_digit(s[i])) ++i;
  }
  if (i + 1 < s.size() && s[i] == '/' && is_digit(s[i + 1])) {
    ++i;
    while (i < s.size() && is_digit(s[i])) ++i;
  }
  if (i < s.size() && s[i] == '%') ++i;
  return i - pos;
}

// Plain decimal: "12", "1,234", "1,234.5", "0.5", ".5" (no sign, no symbols).
std::optional<double> parse_plain(std::string_view s) {
  if (s.empty()) return std::nullopt;
  size_t i = 0;
  std::string digits;
  while (i < s.size() && is_digit(s[i])) digits += s[i++];
  if (digits.size() > 0 && i < s.size() && s[i] == ',') {
    if (digits.size() > 3) return std::nullopt;
    while (i < s.size() && s[i] == ',') {
      if (i + 4 > s.size() || !is_digit(s[i + 1]) || !is_digit(s[i + 2]) || !is_digit(s[i + 3])) return std::nullopt;
      if (i + 4 < s.size() && is_digit(s[i + 4])) return std::nullopt;
      digits.append(s.substr(i + 1, 3));
      i += 4;
    }
  }
  if (i < s.size() && s[i] == '.') {
    digits += '.';
    ++i;
    size_t frac_start = i;
    while (i < s.size() && is_digit(s[i])) digits += s[i++];
    if (i == frac_start) return std::nullopt;
  }
  if (i != s.size() || digits.empty() || digits == ".") return std::nullopt;
  return std::strtod(digits.c_str(), nullptr);
}

// "{3}{4}" or "34" after \frac: numerator and denominator.
std::optional<double> parse_frac_args(std::string_view s) {
  std::string_view num, den;
  if (!s.empty() && s[0] == '{') {
    size_t e = match_brace(s, 0);
    if (e == std::string::npos) return std::nullopt;
    num = s.substr(1, e - 2);
    s.remove_prefix(e);
  } else if (s.size() >= 1 && is_digit(s[0])) {
    num = s.substr(0, 1);
    s.remove_prefix(1);
  } else {
    return std::nullopt;
  }
  if (!s.empty() && s[0] == '{') {
    size_t e = match_brace(s, 0);
    if (e != s.size()) return std::nullopt;
    den = s.substr(1, e - 2);
  } else if (s.size() == 1 && is_digit(s[0])) {
    den = s;
  } else {
    return std::nullopt;
  }
  auto n = parse_plain(trim(num)), d = parse_plain(trim(den));
  if (!n || !d || *d == 0) return std::nullopt;
  return *n / *d;
}

}  // namespace

std::optional<double> parse_number(std::string_view text) {
  std::string s(trim(text));
  replace_all(&s, "\\$", "");
  replace_all(&s, "$", "");
  replace_all(&s, "\\!", "");
  replace_all(&s, "{,}", ",");  // LaTeX thousands "1{,}000"
  std::string_view v = trim(s);
  if (!v.empty() && v.back() == '.') v.remove_suffix(1);  // "42." at the end of a sentence
  if (starts_with(v, "\\%") || (v.size() >= 2 && v.substr(v.size() - 2) == "\\%")) {
    v.remove_suffix(2);
  } else if (!v.empty() && v.back() == '%') {
    v.remove_suffix(1);
  }
  v = trim(v);
  double sign = 1;
  if (!v.empty() && (v[0] == '-' || v[0] == '+')) {
    sign = v[0] == '-' ? -1 : 1;
    v = trim(v.substr(1));
  }
  for (std::string_view cmd : {"\\frac", "\\dfrac", "\\tfrac"}) {
    if (starts_with(v, cmd)) {
      auto r = parse_frac_args(trim(v.substr(cmd.size())));
      if (r) return sign * *r;
      return std::nullopt;
    }
  }
  size_t slash = v.find('/');
  if (slash != std::string_view::npos) {
    auto n = parse_plain(trim(v.substr(0, slash))), d = parse_plain(trim(v.substr(slash + 1)));
    if (!n || !d || *d == 0) return std::nullopt;
    return sign * *n / *d;
  }
  auto r = parse_plain(v);
  if (!r) return std::nullopt;
  return sign * *r;
}

std::string normalize_answer(std::string_view text) {
  std::string s(text);
  for (std::string_view sp : {"\\!", "\\,", "\\;", "\\:", "\\ "}) replace_all(&s, sp, "");
  remove_command(&s, "\\left");
  remove_command(&s, "\\right");
  replace_all(&s, "\\dfrac", "\\frac");
  replace_all(&s, "\\tfrac", "\\frac");
  replace_all(&s, "^{\\circ}", "");
  replace_all(&s, "^\\circ", "");
  replace_all(&s, "\\%", "");
  replace_all(&s, "%", "");
  replace_all(&s, "\\$", "");
  replace_all(&s, "$", "");
  // \text{X} -> X (and friends): keep the content, drop the wrapper.
  for (std::string_view cmd : {"\\textbf{", "\\text{", "\\mbox{", "\\mathrm{"}) {
    for (size_t pos = 0; (pos = s.find(cmd, pos)) != std::string::npos;) {
      size_t open = pos + cmd.size() - 1;
      size_t end = match_brace(s, open);
      if (end == std::string::npos) break;
      s = s.substr(0, pos) + s.substr(open + 1, end - open - 2) + s.substr(end);
    }
  }
  s.erase(std::remove_if(s.begin(), s.end(), is_space), s.end());
  while (!s.empty() && s.back() == '.') s.pop_back();
  if (s.size() > 2 && is_alpha(s[0]) && s[1] == '=' && s.find('=', 2) == std::string::npos) s = s.substr(2);
  return s;
}

bool answers_equivalent(std::string_view a, std::string_view b) {
  std::string na = normalize_answer(a), nb = normalize_answer(b);
  auto pa = parse_number(a);
  if (!pa) pa = parse_number(na);
  auto pb = parse_number(b);
  if (!pb) pb = parse_number(nb);
  if (pa && pb) return std::fabs(*pa - *pb) <= 1e-6 * std::max({1.0, std::fabs(*pa), std::fabs(*pb)});
  return !na.empty() && na == nb;
}

std::optional<std::string> extract_final_answer(std::string_view r) {
  // 1. GSM8K "#### N"
  size_t hashes = r.rfind("####");
  if (hashes != std::string_view::npos) {
    std::string_view rest = r.substr(hashes + 4);
    rest = trim(rest.substr(0, rest.find('\n')));
    if (!rest.empty()) return std::string(rest);
  }
  // 2. the last \boxed{...} / \fbox{...}
  size_t best = std::string_view::npos, cmd_len = 0;
  for (std::string_view cmd : {"\\boxed", "\\fbox"}) {
    size_t p = r.rfind(cmd);
    if (p != std::string_view::npos && (best == std::string_view::npos || p > best)) best = p, cmd_len = cmd.size();
  }
  if (best != std::string_view::npos) {
    size_t i = best + cmd_len;
    while (i < r.size() && is_space(r[i])) ++i;
    if (i < r.size() && r[i] == '{') {
      size_t end = match_brace(r, i);
      if (end != std::string_view::npos) {
        std::string_view inner = trim(r.substr(i + 1, end - i - 2));
        if (!inner.empty()) return std::string(inner);
      }
    } else if (i > best + cmd_len) {  // "\boxed 5"
      size_t e = i;
      while (e < r.size() && !is_space(r[e]) && r[e] != '$') ++e;
      if (e > i) return std::string(r.substr(i, e - i));
    }
  }
  // 3. "... answer is X"
  std::string lower(r);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  size_t ai = lower.rfind("answer is");
  if (ai != std::string::npos) {
    std::string_view rest = r.substr(ai + 9);
    while (!rest.empty() && (is_space(rest[0]) || rest[0] == ':')) rest.remove_prefix(1);
    rest = rest.substr(0, rest.find('\n'));
    size_t n = scan_number(rest, 0);
    if (n > 0 && (n == rest.size() || is_space(rest[n]) || std::string_view(".,;!?)").find(rest[n]) != std::string_view::npos))
      return std::string(rest.substr(0, n));
    std::string_view x = trim(rest);
    while (!x.empty() && x.back() == '.') x = trim(x.substr(0, x.size() - 1));
    if (x.size() >= 2 && x.front() == '$' && x.back() == '$') x = trim(x.substr(1, x.size() - 2));
    if (!x.empty()) return std::string(x);
  }
  // 4. the last number
  std::optional<std::string> last;
  for (size_t i = 0; i < r.size();) {
    bool can_start = (is_digit(r[i]) || r[i] == '-' || r[i] == '$') && (i == 0 || !is_alpha(r[i - 1]));
    size_t n = can_start ? scan_number(r, i) : 0;
    if (n > 0) {
      last = std::string(r.substr(i, n));
      i += n;
    } else {
      ++i;
    }
  }
  return last;
}

double verify_math(std::string_view response, std::string_view reference) {
  std::string ref(trim(reference));
  if (ref.find("####") != std::string::npos || ref.find("\\boxed") != std::string::npos) {
    auto x = extract_final_answer(ref);
    ref = x ? *x : "";
  }
  if (ref.empty()) return 0.0;
  auto got = extract_final_answer(response);
  return got && answers_equivalent(*got, ref) ? 1.0 : 0.0;
}

namespace {
std::string collapse_space(std::string_view s) {
  std::string out;
  bool pending = false;
  for (char c : trim(s)) {
    if (is_space(c)) {
      pending = true;
      continue;
    }
    if (pending) out += ' ';
    pending = false;
    out += c;
  }
  return out;
}

size_t count(std::string_view s, std::string_view needle) {
  size_t n = 0;
  for (size_t p = s.find(needle); p != std::string_view::npos; p = s.find(needle, p + needle.size())) ++n;
  return n;
}
}  // namespace

double verify_exact(std::string_view response, std::string_view reference) {
  return collapse_space(response) == collapse_space(reference) ? 1.0 : 0.0;
}

double verify_format_think(std::string_view response, std::string_view /*reference*/) {
  std::string_view s = trim(response);
  for (std::string_view tag : {"<think>", "</think>", "<answer>", "</answer>"})
    if (count(s, tag) != 1) return 0.0;
  if (!starts_with(s, "<think>") || s.size() < 9 || s.substr(s.size() - 9) != "</answer>") return 0.0;
  size_t think_end = s.find("</think>"), ans_open = s.find("<answer>");
  if (think_end > ans_open) return 0.0;
  if (!trim(s.substr(think_end + 8, ans_open - think_end - 8)).empty()) return 0.0;
  bool think_body = !trim(s.substr(7, think_end - 7)).empty();
  bool answer_body = !trim(s.substr(ans_open + 8, s.size() - 9 - ans_open - 8)).empty();
  return think_body && answer_body ? 1.0 : 0.0;
}

double verify_format_answer(std::string_view response, std::string_view /*reference*/) {
  constexpr std::string_view kLead = "The answer is ";
  std::string_view s = trim(response);
  if (s.empty() || s.back() != '.') return 0.0;
  size_t p = s.rfind(kLead);
  if (p == std::string_view::npos) return 0.0;
  if (p > 0 && !is_space(s[p - 1]) && std::string_view(".!?").find(s[p - 1]) == std::string_view::npos) return 0.0;
  std::string_view n = s.substr(p + kLead.size(), s.size() - 1 - p - kLead.size());
  if (n.empty() || n.back() == '.' || is_space(n.front()) || is_space(n.back())) return 0.0;
  return parse_number(n) ? 1.0 : 0.0;
}

const std::vector<Verifier>& verifiers() {
  static const std::vector<Verifier> kVerifiers = {
      {"math", "final answer (#### N, \\boxed{}, 'The answer is N', last number) equals the reference by value",
       verify_math},
      {"exact", "response equals the reference, whitespace-normalised", verify_exact},
      {"format_think", "response is <think>...</think><answer>...</answer>", verify_format_think},
      {"format_answer", "response ends with 'The answer is N.' (N a number)", verify_format_answer},
  };
  return kVerifiers;
}

std::string verifier_names() {
  std::string out;
  for (const auto& v : verifiers()) out += (out.empty() ? "" : ", ") + std::string(v.name);
  return out;
}

const Verifier& find_verifier(std::string_view name) {
  std::vector<std::string> names;
  for (const auto& v : verifiers()) {
    if (name == v.name) return v;
    names.push_back(v.name);
  }
  std::string hint = nearest(name, names);
  throw Error("unknown verifier `" + std::string(name) + "`" + (hint.empty() ? "" : " (did you mean `" + hint + "`?)") +
              "\n---> HINT: known verifiers: " + verifier_names());
}

}  // namespace ptk::reward
