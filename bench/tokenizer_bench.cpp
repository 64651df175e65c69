// Tokenizer throughput: ptk vs Hugging Face tokenizers (the Python binding in .venv, run in the
// same process tree on the same documents), one thread and all threads, MB/s and tokens/s. Prints figures and
// never fails on time. Not a correctness test (tests/tokenizer), though it checks ids agree.
//   build-tok/bench/tokenizer_bench [tokenizer.json] [max_MB]
// Documents: every string in ../shared/data/{sft,math} JSON/JSONL files when present, else the
// committed test corpus repeated.
#include <chrono>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <unistd.h>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "bench/bench_util.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace fs = std::filesystem;
using ptk::tokenizer::TokenId;
using ptk::tokenizer::Tokenizer;

namespace {

void collect_strings(const rapidjson::Value& v, std::vector<std::string>* out) {
  if (v.IsString() && v.GetStringLength() > 0) {
    out->emplace_back(v.GetString(), v.GetStringLength());
  } else if (v.IsArray()) {
    for (const auto& x : v.GetArray()) collect_strings(x, out);
  } else if (v.IsObject()) {
    for (auto it = v.MemberBegin(); it != v.MemberEnd(); ++it) collect_strings(it->value, out);
  }
}

std::vector<std::string> load_docs(const std::string& root, size_t max_bytes, std::string* source) {
  std::vector<std::string> docs;
  std::string shared = root + "/../shared/data";
  std::vector<std::string> files;
  if (fs::exists(shared))
    for (const auto& e : fs::recursive_directory_iterator(shared)) {
      std::string p = e.path().string();
      if (e.is_regular_file() && (p.find("/sft/") != std::string::npos || p.find("/math/") != std::string::npos) &&
          (p.size() > 5 && (p.substr(p.size() - 5) == ".json" || p.substr(p.size() - 6) == ".jsonl")))
        files.push_back(p);
    }
  std::sort(files.begin(), files.end());
  size_t total = 0;
  for (const auto& f : files) {
    std::string text = ptk::read_file(f);
    std::vector<std::string> found;
    if (f.substr(f.size() - 6) == ".jsonl") {
      size_t b = 0;
      while (b < text.size()) {
        size_t e = text.find('\n', b);
        if (e == std::string::npos) e = text.size();
        rapidjson::Document d;
        if (ptk::json::parse_into(d, std::string_view(text).substr(b, e - b)).ok()) collect_strings(d, &found);
        b = e + 1;
      }
    } else {
      rapidjson::Document d;
      if (ptk::json::parse_into(d, text).ok()) collect_strings(d, &found);
    }
    for (auto& s : found) {
      if (total >= max_bytes) break;
      total += s.size();
      docs.push_back(std::move(s));
    }
  }
  if (!docs.empty()) {
    *source = std::to_string(files.size()) + " files under ../shared/data (sft, math)";
    return docs;
  }
  // Fallback: the test corpus, repeated.
  std::string corpus = ptk::read_file(root + "/tests/tokenizer/data/corpus.jsonl");
  std::vector<std::string> base;
  size_t b = 0;
  while (b < corpus.size()) {
    size_t e = corpus.find('\n', b);
    if (e == std::string::npos) e = corpus.size();  // a last line without "\n" (was read past the end)
    rapidjson::Document d;
    if (ptk::json::parse_into(d, std::string_view(corpus).substr(b, e - b)).ok() && d.IsObject() && d.HasMember("text")) base.emplace_back(d["text"].GetString(), d["text"].GetStringLength());
    b = e + 1;
  }
  while (total < max_bytes) {
    for (const auto& s : base) docs.push_back(s), total += s.size();
  }
  *source = "tests/tokenizer/data/corpus.jsonl repeated";
  return docs;
}

struct Result {
  double seconds = 0;
  size_t tokens = 0;
  long long checksum = 0;
};

Result run_hf(const std::string& root, const std::string& tok, const std::string& docs_path, bool one_thread) {
  std::string cmd = std::string(one_thread ? "TOKENIZERS_PARALLELISM=false " : "") + root + "/.venv/bin/python3 " +
                    root + "/bench/tokenizer_hf_bench.py " + tok + " " + docs_path;
  FILE* p = popen(cmd.c_str(), "r");
  Result r;
  if (!p) return r;
  char buf[512];
  std::string out;
  while (fgets(buf, sizeof buf, p)) out += buf;
  if (pclose(p) != 0) return r;
  rapidjson::Document d;
  if (!ptk::json::parse_into(d, out).ok() || !d.IsObject()) return r;
  r.seconds = d["seconds"].GetDouble();
  r.tokens = d["tokens"].GetUint64();
  r.checksum = d["checksum"].GetInt64();
  return r;
}

Result run_ptk(const Tokenizer& t, const std::vector<std::string>& docs, int threads) {
  Result best;
  for (int rep = 0; rep < 2; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::vector<TokenId>> out;
    if (threads == 1) {
      out.reserve(docs.size());
      for (const auto& d : docs) out.push_back(t.encode(d));
    } else {
      out = t.encode_batch(docs, threads);
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    Result r;
    r.seconds = s;
    for (const auto& ids : out)
      for (TokenId id : ids) {
        ++r.tokens;
        r.checksum = (r.checksum * 31 + id) % 1000000007LL;
      }
    if (rep == 0 || s < best.seconds) best = r;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string root = ptk::bench::source_dir();
  std::string tok = argc > 1 ? argv[1] : root + "/assets/tokenizers/qwen/tokenizer.json";
  if (!fs::exists(tok)) tok = root + "/../shared/tokenizers/qwen/tokenizer.json";
  if (!fs::exists(tok)) {
    std::fprintf(stderr, "tokenizer_bench: no Qwen tokenizer.json (run scripts/setup.sh or pass a path)\n");
    return 1;
  }
  size_t max_mb = argc > 2 ? std::stoul(argv[2]) : 16;
  std::string source;
  std::vector<std::string> docs = load_docs(root, max_mb << 20, &source);
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();
  double mb = bytes / 1e6;

  auto t0 = std::chrono::steady_clock::now();
  Tokenizer t = Tokenizer::load(tok);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::string docs_path = (fs::temp_directory_path() / ("ptk_tok_bench_" + std::to_string(getpid()) + ".json")).string();
  {
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    w.StartArray();
    for (const auto& d : docs) w.String(d.data(), static_cast<rapidjson::SizeType>(d.size()));
    w.EndArray();
    ptk::write_file_atomic(docs_path, std::string_view(sb.GetString(), sb.GetSize()));
  }
  unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  std::printf("tokenizer_bench: %s\n  %zu documents, %.2f MB; tokenizer %s (load %.2f s); %u cores\n", source.c_str(),
              docs.size(), mb, tok.c_str(), load_s, cores);
  std::printf("  %-28s %10s %10s %12s %8s\n", "", "seconds", "MB/s", "tokens/s", "ratio");
  for (int threads : {1, 0}) {
    Result ours = run_ptk(t, docs, threads == 0 ? static_cast<int>(cores) : 1);
    Result hf = run_hf(root, tok, docs_path, threads == 1);
    const char* label = threads == 1 ? "1 thread" : "all threads";
    std::printf("  ptk %-24s %10.3f %10.2f %12.0f %8s\n", label, ours.seconds, mb / ours.seconds, ours.tokens / ours.seconds, "");
    if (hf.seconds > 0) {
      std::printf("  HF tokenizers %-14s %10.3f %10.2f %12.0f %7.2fx  (ids %s)\n", label, hf.seconds, mb / hf.seconds,
                  hf.tokens / hf.seconds, hf.seconds / ours.seconds,
                  hf.tokens == ours.tokens && hf.checksum == ours.checksum ? "identical" : "DIFFER");
    } else {
      std::printf("  HF tokenizers %-14s (.venv/bin/python3 with tokenizers missing: baseline skipped)\n", label);
    }
  }
  std::remove(docs_path.c_str());
  return 0;
}
