// The arithmetic demo task generator (see arithmetic.h). The random stream is SplitMix64 with our own
// bounded draw, never <random>'s distributions, whose outputs differ between standard libraries:
// the same seed gives the same bytes on every machine.
#include "datasets/arithmetic.h"

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::tasks {
namespace {

// Above this many distinct problems the splits are drawn by rejection instead of enumerated.
constexpr int64_t kEnumerateLimit = 2'000'000;
// `--train 0` (all remaining problems) is refused above this many.
constexpr int64_t kAllTrainLimit = 1'000'000;

class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), unbiased (rejects the short last block).
  uint64_t below(uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do x = next();
    while (x >= limit);
    return x % n;
  }

 private:
  uint64_t s_;
};

int64_t pow10(int d) {
  int64_t r = 1;
  while (d-- > 0) r *= 10;
  return r;
}

// Problems of one op in a fixed order: index -> (a, b).
int64_t op_count(char op, int64_t n) { return op == '-' ? n * (n + 1) / 2 : n * n; }

ArithmeticProblem problem_at(char op, int64_t n, int64_t k) {
  ArithmeticProblem p;
  p.op = op;
  if (op != '-') {
    p.a = k / n;
    p.b = k % n;
    return p;
  }
  // Row a holds b = 0..a (a + 1 problems); rows before a hold a(a+1)/2.
  int64_t a = static_cast<int64_t>((std::sqrt(8.0 * static_cast<double>(k) + 1) - 1) / 2);
  while (a * (a + 1) / 2 > k) --a;
  while ((a + 1) * (a + 2) / 2 <= k) ++a;
  p.a = a;
  p.b = k - a * (a + 1) / 2;
  return p;
}

std::string distinct_ops(const std::string& ops) {
  std::string out;
  for (char c : ops)
    if (out.find(c) == std::string::npos) out += c;
  return out;
}

void write_message(rapidjson::Writer<rapidjson::StringBuffer>& w, const std::string& role, const std::string& content) {
  w.StartObject();
  w.Key("role");
  w.String(role.c_str());
  w.Key("content");
  w.String(content.c_str());
  w.EndObject();
}

// [{"role": role, "content": content}]
void write_turn(rapidjson::Writer<rapidjson::StringBuffer>& w, const char* key, const std::string& role,
                const std::string& content) {
  w.Key(key);
  w.StartArray();
  write_message(w, role, content);
  w.EndArray();
}

std::string finish_line(rapidjson::StringBuffer& buf) { return std::string(buf.GetString(), buf.GetSize()) + "\n"; }

}  // namespace

int64_t ArithmeticProblem::answer() const { return op == '+' ? a + b : op == '-' ? a - b : a * b; }

std::string ArithmeticProblem::question() const {
  auto num = [this](int64_t x) {
    std::string t = std::to_string(x);
    return static_cast<int>(t.size()) < width ? std::string(static_cast<size_t>(width) - t.size(), '0') + t : t;
  };
  return "What is " + num(a) + " " + op + " " + num(b) + "?";
}

std::string ArithmeticProblem::answer_text() const { return "The answer is " + std::to_string(answer()) + "."; }

int64_t arithmetic_problem_count(int digits, const std::string& ops) {
  int64_t n = pow10(digits), total = 0;
  for (char op : distinct_ops(ops)) total += op_count(op, n);
  return total;
}

ArithmeticSplits arithmetic_splits(const ArithmeticOptions& opt) {
  std::string errors;
  if (opt.digits < 1 || opt.digits > 9)
    errors += "  --digits " + std::to_string(opt.digits) + ": must be 1..9 (products must fit in 64 bits)\n";
  if (opt.ops.empty()) errors += "  --ops is empty: give one or more of + - *\n";
  for (char c : opt.ops)
    if (c != '+' && c != '-' && c != '*')
      errors += std::string("  --ops `") + opt.ops + "`: `" + c + "` is not one of + - *\n";
  if (opt.eval < 1) errors += "  --eval " + std::to_string(opt.eval) + ": must be at least 1\n";
  if (opt.train < 0) errors += "  --train " + std::to_string(opt.train) + ": must be >= 0 (0 = every problem not held out)\n";
  if (opt.operands != "padded" && opt.operands != "plain")
    errors += "  --operands `" + opt.operands + "`: must be padded or plain\n";
  if (!errors.empty()) throw Error("ptk make-data arithmetic: bad options:\n" + errors);

  std::string ops = distinct_ops(opt.ops);
  const int64_t n = pow10(opt.digits);
  const int64_t total = arithmetic_problem_count(opt.digits, ops);
  int64_t train = opt.train;
  if (train == 0) {
    train = total - opt.eval;
    if (train > kAllTrainLimit)
      throw Error("ptk make-data arithmetic: --digits " + std::to_string(opt.digits) + " has " + std::to_string(total) +
                  " problems; --train 0 (all of them) would write " + std::to_string(train) +
                  " lines\n---> HINT: pass --train N (e.g. --train 100000)");
  }
  if (train < 1 || opt.eval + train > total)
    throw Error("ptk make-data arithmetic: --digits " + std::to_string(opt.digits) + " --ops " + ops + " has only " +
                std::to_string(total) + " distinct problems, fewer than --eval " + std::to_string(opt.eval) +
                " + --train " + std::to_string(train) +
                " (the splits are disjoint by problem)\n---> HINT: lower --train/--eval or raise --digits");

  Rng rng(opt.seed);
  std::vector<ArithmeticProblem> drawn;
  drawn.reserve(static_cast<size_t>(opt.eval + train));
  auto from_index = [&](int64_t k) {
    for (char op : ops) {
      int64_t c = op_count(op, n);
      if (k < c) return problem_at(op, n, k);
      k -= c;
    }
    throw Error("internal: problem index out of range");
  };
  if (total <= kEnumerateLimit) {
    // Partial Fisher-Yates over all indices: the first eval+train of a seeded permutation.
    std::vector<int64_t> idx(static_cast<size_t>(total));
    for (int64_t i = 0; i < total; ++i) idx[i] = i;
    for (int64_t i = 0; i < opt.eval + train; ++i) {
      int64_t j = i + static_cast<int64_t>(rng.below(static_cast<uint64_t>(total - i)));
      std::swap(idx[i], idx[j]);
      drawn.push_back(from_index(idx[i]));
    }
  } else {
    std::unordered_set<int64_t> seen;
    while (static_cast<int64_t>(drawn.size()) < opt.eval + train) {
      int64_t k = static_cast<int64_t>(rng.below(static_cast<uint64_t>(total)));
      if (seen.insert(k).second) drawn.push_back(from_index(k));
    }
  }
  if (opt.operands == "padded")
    for (auto& p : drawn) p.width = opt.digits;
  ArithmeticSplits s;
  s.eval.assign(drawn.begin(), drawn.begin() + opt.eval);
  s.train.assign(drawn.begin() + opt.eval, drawn.end());
  return s;
}

int64_t arithmetic_wrong_answer(const ArithmeticProblem& p, uint64_t salt) {
  const int64_t right = p.answer();
  std::vector<int64_t> cand = {right + 1, right - 1, right + 10, right - 10};
  if (p.op == '*') {
    cand.push_back(right + p.a);  // one times too many
    cand.push_back(right - p.a);
    cand.push_back(p.a + p.b);    // the wrong operation
  } else {
    cand.push_back(p.op == '+' ? std::max(p.a, p.b) : p.a);  // an operand forgotten
    cand.push_back(p.op == '+' ? p.a - p.b : p.a + p.b);     // the wrong operation
  }
  std::string digits = std::to_string(right);
  if (digits.size() >= 2) {  // the last two digits swapped
    std::swap(digits[digits.size() - 1], digits[digits.size() - 2]);
    cand.push_back(std::stoll(digits));
  }
  cand.erase(std::remove_if(cand.begin(), cand.end(), [&](int64_t c) { return c < 0 || c == right; }), cand.end());
  std::sort(cand.begin(), cand.end());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  // right + 1 is never negative and never right, so cand is not empty.
  Rng rng(salt ^ (static_cast<uint64_t>(p.a) * 0x100000001B3ull) ^ (static_cast<uint64_t>(p.b) << 32) ^
          static_cast<uint64_t>(p.op));
  return cand[rng.below(cand.size())];
}

std::string arithmetic_sft_jsonl(const std::vector<ArithmeticProblem>& problems) {
  std::string out;
  for (const auto& p : problems) {
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    w.StartObject();
    w.Key("messages");
    w.StartArray();
    write_message(w, "user", p.question());
    write_message(w, "assistant", p.answer_text());
    w.EndArray();
    w.EndObject();
    out += finish_line(buf);
  }
  return out;
}

std::string arithmetic_preference_jsonl(const std::vector<ArithmeticProblem>& problems, uint64_t seed) {
  std::string out;
  for (const auto& p : problems) {
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    w.StartObject();
    write_turn(w, "prompt", "user", p.question());
    write_turn(w, "chosen", "assistant", p.answer_text());
    write_turn(w, "rejected", "assistant", "The answer is " + std::to_string(arithmetic_wrong_answer(p, seed)) + ".");
    w.EndObject();
    out += finish_line(buf);
  }
  return out;
}

std::string arithmetic_rl_jsonl(const std::vector<ArithmeticProblem>& problems) {
  std::string out;
  for (const auto& p : problems) {
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    w.StartObject();
    write_turn(w, "prompt", "user", p.question());
    w.Key("answer");
    w.String(std::to_string(p.answer()).c_str());
    w.EndObject();
    out += finish_line(buf);
  }
  return out;
}

std::vector<WrittenFile> write_arithmetic_dataset(const std::string& out_dir, const ArithmeticOptions& opt) {
  ArithmeticSplits s = arithmetic_splits(opt);
  make_dirs(out_dir);
  std::vector<WrittenFile> written;
  auto put = [&](const std::string& name, const std::string& text, int64_t lines) {
    std::string path = out_dir + "/" + name;
    write_file_atomic(path, text);
    written.push_back({path, lines});
  };
  const int64_t nt = static_cast<int64_t>(s.train.size()), ne = static_cast<int64_t>(s.eval.size());
  put("sft_train.jsonl", arithmetic_sft_jsonl(s.train), nt);
  put("sft_eval.jsonl", arithmetic_sft_jsonl(s.eval), ne);
  put("preference_train.jsonl", arithmetic_preference_jsonl(s.train, opt.seed), nt);
  put("preference_eval.jsonl", arithmetic_preference_jsonl(s.eval, opt.seed), ne);
  put("rl_train.jsonl", arithmetic_rl_jsonl(s.train), nt);
  put("rl_eval.jsonl", arithmetic_rl_jsonl(s.eval), ne);

  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  w.StartObject();
  w.Key("task");
  w.String("arithmetic");
  w.Key("seed");
  w.Uint64(opt.seed);
  w.Key("digits");
  w.Int(opt.digits);
  w.Key("ops");
  w.String(distinct_ops(opt.ops).c_str());
  w.Key("operands");
  w.String(opt.operands.c_str());
  w.Key("train");
  w.Int64(nt);
  w.Key("eval");
  w.Int64(ne);
  w.Key("distinct_problems");
  w.Int64(arithmetic_problem_count(opt.digits, opt.ops));
  w.EndObject();
  rapidjson::Document d = json::parse(std::string(buf.GetString(), buf.GetSize()), "manifest");
  put("manifest.json", json::to_string(d, /*pretty=*/true) + "\n", 0);
  return written;
}

}  // namespace ptk::tasks
