// prepare_bench: `ptk prepare` at scale. Builds an N-record chat JSONL (default 1,000,000) by sampling
// the chat conversations of ../shared/data (mapped by tests/datasets/shared_data.cpp), then measures
// the raw batch-encode throughput of the tokenizer on the same rendered text, `ptk prepare` (wall,
// MB/s, tokens/s, peak RSS of the process) and the loader's RSS while it walks a whole epoch.
// Prints figures; never fails on time. Not a correctness test (tests/datasets).
//
//   build-data/bench/prepare_bench [--records N] [--work DIR] [--tokenizer DIR] [--ptk PATH] [--keep]
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/tokenizer/messages_json.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/loader.h"
#include "tests/datasets/shared_data.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Resident set of this process in bytes (VmRSS).
double rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::atof(line.c_str() + 6) * 1024.0;
  return 0;
}

std::string arg(int argc, char** argv, const char* name, const std::string& def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  return def;
}
bool flag(int argc, char** argv, const char* name) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return true;
  return false;
}

double rss_file_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("RssFile:", 0) == 0) return std::atof(line.c_str() + 8) * 1024.0;
  return 0;
}

// Child mode: walk one epoch of a prepared folder, printing RSS samples as "rss <batch> <bytes>".
int walk(const std::string& dir) {
  double before_open = rss_bytes();
  auto set = ptk::data::PreparedSet::open(dir);
  ptk::data::Loader loader(set, {8, 0, 1, 1234});
  int64_t n = loader.batches_per_epoch(), tokens = 0;
  double lo = 1e300, hi = 0;
  auto t0 = Clock::now();
  std::printf("rss_open %.0f %.0f\n", before_open, rss_bytes());
  for (int64_t b = 0; b < n; ++b) {
    auto batch = ptk::data::make_sft_batch(set, loader.next_rows(), 0);
    tokens += batch.tokens;
    if (b % std::max<int64_t>(1, n / 20) == 0 || b == n - 1) {
      double r = rss_bytes();
      lo = std::min(lo, r);
      hi = std::max(hi, r);
      std::printf("rss %lld %.0f (file %.0f)\n", static_cast<long long>(b), r, rss_file_bytes());
    }
  }
  std::printf("walk %lld batches %lld tokens %.2f s min_rss %.0f max_rss %.0f\n", static_cast<long long>(n),
              static_cast<long long>(tokens), seconds_since(t0), lo, hi);
  return 0;
}

// CPU seconds (user + system) this process has used, all threads.
double cpu_seconds() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// VmHWM (peak resident set) of a running process, 0 when it is gone.
double hwm_bytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) * 1024.0;
  return 0;
}

// Runs argv, returns {exit code, wall seconds, peak RSS bytes, CPU seconds of the child}. The peak is
// the child's own VmHWM, polled every 20 ms (ru_maxrss would include this process: Linux carries the
// high-water mark across exec).
struct ChildResult {
  int code;
  double seconds, peak_rss, cpu;
};
ChildResult run_child(const std::vector<std::string>& args) {
  std::vector<char*> av;
  for (const auto& a : args) av.push_back(const_cast<char*>(a.c_str()));
  av.push_back(nullptr);
  auto t0 = Clock::now();
  pid_t pid = 0;
  // posix_spawn (vfork-like): the child does not start with a copy of this process's resident pages,
  // so its ru_maxrss is its own.
  if (::posix_spawn(&pid, av[0], nullptr, nullptr, av.data(), environ) != 0) return {127, 0, 0};
  int status = 0;
  struct rusage ru {};
  double peak = 0;
  while (::wait4(pid, &status, WNOHANG, &ru) == 0) {
    peak = std::max(peak, hwm_bytes(pid));
    ::usleep(20000);
  }
  double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), seconds_since(t0), peak, cpu};
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc >= 3 && std::strcmp(argv[1], "--walk") == 0) return walk(argv[2]);
  const char* src_env = std::getenv("PTK_SOURCE_DIR");
  std::string src = src_env ? src_env : PTK_SOURCE_DIR_DEFAULT;
  const int64_t records = std::atoll(arg(argc, argv, "--records", "1000000").c_str());
  const std::string shared = arg(argc, argv, "--shared", src + "/../shared");
  const std::string tok_dir = arg(argc, argv, "--tokenizer", src + "/assets/tokenizers/qwen");
  const std::string work = arg(argc, argv, "--work", "/tmp/ptk-prepare-bench");
  const std::string ptk = arg(argc, argv, "--ptk", fs::canonical("/proc/self/exe").parent_path().string() + "/../bin/ptk");
  const std::string max_len = arg(argc, argv, "--max-seq-len", "4096");
  if (!ptk::path_exists(shared + "/data/README.md")) {
    std::printf("prepare_bench: %s/data not found; nothing measured (pass --shared DIR)\n", shared.c_str());
    return 0;
  }
  fs::create_directories(work);
  const std::string jsonl = work + "/chat.jsonl";

  // 1. The N-record chat file: conversations sampled with replacement; every third record joins two.
  auto t0 = Clock::now();
  auto convs = ptk::test::shared_chat_conversations(shared + "/data");
  {
    std::mt19937_64 rng(20240601);
    std::ofstream out(jsonl, std::ios::binary | std::ios::trunc);
    std::string line;
    for (int64_t i = 0; i < records; ++i) {
      const std::string& a = convs[rng() % convs.size()];
      line = "{\"messages\":";
      if (i % 3 == 2) {
        const std::string& b = convs[rng() % convs.size()];
        line += a.substr(0, a.size() - 1) + "," + b.substr(1);
      } else {
        line += a;
      }
      line += "}\n";
      out << line;
    }
  }
  const double mib = fs::file_size(jsonl) / 1048576.0;
  std::printf("data: %lld records from %zu shared conversations, %.1f MiB, built in %.1f s\n",
              static_cast<long long>(records), convs.size(), mib, seconds_since(t0));
  std::fflush(stdout);

  // 2. Raw tokenizer throughput on the same text (render untimed, encode_batch on every core timed).
  ptk::tokenizer::LoadOptions lo;
  lo.chat_template = ptk::tokenizer::ChatTemplate::kQwen25;
  auto tok = ptk::tokenizer::Tokenizer::load(tok_dir, lo);
  double encode_s = 0, encode_cpu = 0;
  int64_t raw_tokens = 0, text_bytes = 0;
  {
    std::ifstream in(jsonl, std::ios::binary);
    std::string line;
    std::vector<std::string> texts;
    auto flush = [&] {
      auto t = Clock::now();
      double c = cpu_seconds();
      auto ids = tok.encode_batch(texts, 0);
      encode_s += seconds_since(t);
      encode_cpu += cpu_seconds() - c;
      for (const auto& v : ids) raw_tokens += static_cast<int64_t>(v.size());
      texts.clear();
    };
    while (std::getline(in, line)) {
      auto d = ptk::json::parse(line, jsonl);
      texts.push_back(tok.render_chat_text(ptk::tokenizer::parse_messages(d["messages"], "messages")));
      text_bytes += static_cast<int64_t>(texts.back().size());
      if (texts.size() == 8192) flush();
    }
    if (!texts.empty()) flush();
  }
  std::printf("raw encode_batch: %lld tokens, %.1f MiB rendered text in %.1f s (%.1f CPU s): %.0f tokens/s, %.2f MiB/s\n",
              static_cast<long long>(raw_tokens), text_bytes / 1048576.0, encode_s, encode_cpu, raw_tokens / encode_s,
              text_bytes / 1048576.0 / encode_s);
  std::fflush(stdout);

  // 3. ptk prepare, as a child process (its own peak RSS).
  const std::string out_dir = work + "/prepared";
  auto pr = run_child({ptk, "prepare", "--tokenizer", tok_dir, "tokenizer.chat_template=qwen2.5", "--input", jsonl,
                       "--output", out_dir, "--format", "sft", "--max-seq-len", max_len, "--force", "--quiet"});
  if (pr.code != 0) {
    std::printf("ptk prepare failed with exit code %d\n", pr.code);
    return 1;
  }
  auto m = ptk::json::parse_file(out_dir + "/manifest.json");
  int64_t tokens = m["tokens"]["written"].GetInt64();
  // Throughput on the same text: the raw_tokens the records encode to (before truncation) per wall
  // second of the whole command (process start, tokenizer load, hashing, writing, packing included).
  std::printf("ptk prepare: %.1f s wall, %.2f MiB/s of JSONL, %.0f tokens/s (same text as raw), peak RSS %.0f MiB; "
              "%lld tokens written (after truncation at %s), %lld rows, padding %.2f%%\n",
              pr.seconds, mib / pr.seconds, raw_tokens / pr.seconds, pr.peak_rss / 1048576.0, static_cast<long long>(tokens),
              max_len.c_str(), static_cast<long long>(m["counts"]["rows"].GetInt64()),
              100 * m["tokens"]["padding_fraction"].GetDouble());
  std::printf("ratio: prepare tokens/s / raw encode tokens/s = %.2f wall (goal >= 0.80); CPU-time ratio %.2f "
              "(raw %.1f CPU s / prepare %.1f CPU s; less sensitive to other load on the machine)\n",
              encode_s / pr.seconds, encode_cpu / pr.cpu, encode_cpu, pr.cpu);
  std::fflush(stdout);

  // 4. Reuse check (hashing only) and the loader walking an epoch, in a child process.
  auto again = run_child({ptk, "prepare", "--tokenizer", tok_dir, "tokenizer.chat_template=qwen2.5", "--input", jsonl,
                          "--output", out_dir, "--format", "sft", "--max-seq-len", max_len, "--quiet"});
  std::printf("ptk prepare again (unchanged input, reused): %.1f s\n", again.seconds);
  std::fflush(stdout);
  auto w = run_child({fs::canonical("/proc/self/exe").string(), "--walk", out_dir});
  std::printf("loader walk child: exit %d, %.1f s, peak RSS (VmHWM) %.0f MiB\n", w.code, w.seconds, w.peak_rss / 1048576.0);
  if (!flag(argc, argv, "--keep")) fs::remove_all(work);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "prepare_bench: %s\n", e.what());
  return 1;
}
