// prepare_bench: `ptk prepare` at scale. Builds an N-record chat JSONL (default 1,000,000) by sampling
// the chat conversations of ../shared/data (mapped by tests/datasets/shared_data.cpp), then measures
// the raw batch-encode throughput of the tokenizer on the same rendered text (and the rendering's own
// CPU time, for a second ratio with rendering in the baseline), `ptk prepare` (wall,
// MB/s, tokens/s, peak RSS of the process) and the loader's RSS while it walks a whole epoch.
// Prints figures; never fails on time. Not a correctness test (tests/datasets).
//
//   build-data/bench/prepare_bench [--records N] [--work DIR] [--tokenizer DIR] [--ptk PATH] [--keep]
//                                  [--ptk-before OTHER_PTK]   (also times OTHER_PTK's prepare; checks same bytes)
//   build-data/bench/prepare_bench --phases FILE.jsonl [--phase-records N] [--rounds R]   (one thread, per-phase CPU)
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "core/tokenizer/messages_json.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/loader.h"
#include "datasets/records.h"
#include "tests/datasets/shared_data.h"

namespace fs = std::filesystem;
using ptk::bench::Clock;
using ptk::bench::seconds_since;

namespace {


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

// Child mode: one thread, the first `limit` records of `jsonl`, each phase of prepare's per-record
// work timed alone (CPU seconds of this thread), so the gap between prepare and the raw encode can be
// attributed. The word cache is as warm for every phase (same thread, same records, best of rounds).
int phases(const std::string& jsonl, const std::string& tok_dir, int64_t limit, int rounds) {
  ptk::tokenizer::LoadOptions lo;
  lo.chat_template = ptk::tokenizer::ChatTemplate::kQwen25;
  auto tok = ptk::tokenizer::Tokenizer::load(tok_dir, lo);
  std::vector<std::string> lines, texts;
  std::vector<std::vector<ptk::tokenizer::Message>> convs;
  {
    std::ifstream in(jsonl, std::ios::binary);
    std::string line;
    while (static_cast<int64_t>(lines.size()) < limit && std::getline(in, line)) lines.push_back(line);
  }
  int64_t bytes = 0, tokens = 0;
  for (const auto& l : lines) bytes += static_cast<int64_t>(l.size());
  auto thread_cpu = [] {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  };
  // Each phase's best of `rounds` passes over the same records; the phases alternate within a round,
  // so a burst of load from other processes hits them alike.
  struct Phase {
    const char* name;
    std::function<void()> body;
    double best = 1e300;
  };
  std::string reason;
  std::vector<Phase> ph;
  ph.push_back({"utf8 check + JSON parse (Record)", [&] {
                  convs.clear();
                  for (const auto& l : lines) {
                    ptk::data::Record rec;
                    if (!ptk::data::parse_record(l, ptk::data::Format::kSft, &rec, &reason))
                      throw ptk::Error("bad record: " + reason);
                    convs.push_back(std::move(rec.sft.messages));
                  }
                }});
  ph.push_back({"render text", [&] {
                  texts.clear();
                  for (const auto& c : convs) texts.push_back(tok.render_chat_text(c));
                }});
  ph.push_back({"encode(text) (the raw baseline)", [&] {
                  tokens = 0;
                  for (const auto& t : texts) tokens += static_cast<int64_t>(tok.encode(t).size());
                }});
  ph.push_back({"render_chat (render+encode+mask)", [&] {
                  for (const auto& c : convs) tok.render_chat(c);
                }});
  for (int round = 0; round < rounds; ++round)
    for (auto& p : ph) {
      double c = thread_cpu();
      p.body();
      p.best = std::min(p.best, thread_cpu() - c);
    }
  for (const auto& p : ph)
    std::printf("phase %-34s %7.3f CPU s  %7.2f us/record\n", p.name, p.best, 1e6 * p.best / static_cast<double>(lines.size()));
  const double enc = ph[2].best, rc = ph[3].best;
  std::printf("phases: %zu records, %.1f MiB JSONL, %lld tokens; render_chat / encode = %.3f\n", lines.size(),
              bytes / 1048576.0, static_cast<long long>(tokens), rc / enc);
  return 0;
}

// True when two files hold the same bytes.
bool same_bytes(const std::string& a, const std::string& b) {
  std::ifstream fa(a, std::ios::binary), fb(b, std::ios::binary);
  std::vector<char> ba(1 << 20), bb(1 << 20);
  for (;;) {
    fa.read(ba.data(), static_cast<std::streamsize>(ba.size()));
    fb.read(bb.data(), static_cast<std::streamsize>(bb.size()));
    if (fa.gcount() != fb.gcount()) return false;
    if (std::memcmp(ba.data(), bb.data(), static_cast<size_t>(fa.gcount())) != 0) return false;
    if (fa.gcount() == 0 || !fa || !fb) return fa.eof() && fb.eof() && fa.gcount() == fb.gcount();
  }
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
  if (::posix_spawn(&pid, av[0], nullptr, nullptr, av.data(), environ) != 0) return {127, 0, 0, 0};
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
  const std::string src = ptk::bench::source_dir();
  const int64_t records = std::atoll(arg(argc, argv, "--records", "1000000").c_str());
  const std::string shared = arg(argc, argv, "--shared", src + "/../shared");
  const std::string tok_dir = arg(argc, argv, "--tokenizer", src + "/assets/tokenizers/qwen");
  const std::string work = arg(argc, argv, "--work", "/tmp/ptk-prepare-bench");
  const std::string ptk = arg(argc, argv, "--ptk", fs::canonical("/proc/self/exe").parent_path().string() + "/../bin/ptk");
  const std::string max_len = arg(argc, argv, "--max-seq-len", "4096");
  const std::string phase_file = arg(argc, argv, "--phases", "");
  if (!phase_file.empty()) return phases(phase_file, tok_dir, std::atoll(arg(argc, argv, "--phase-records", "20000").c_str()),
                  std::max(1, std::atoi(arg(argc, argv, "--rounds", "3").c_str())));
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

  // 2. Raw tokenizer throughput on the same text: encode_batch on every core, timed. The JSON parse
  // and the chat rendering run on this thread between batches; they are timed apart (CPU time of
  // this thread), so that the ratio can be given against encoding alone and against rendering +
  // encoding (what prepare does besides reading JSON and writing shards).
  ptk::tokenizer::LoadOptions lo;
  lo.chat_template = ptk::tokenizer::ChatTemplate::kQwen25;
  auto tok = ptk::tokenizer::Tokenizer::load(tok_dir, lo);
  double encode_s = 0, encode_cpu = 0, parse_cpu = 0, render_cpu = 0;
  int64_t raw_tokens = 0, text_bytes = 0;
  auto thread_cpu = [] {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  };
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
      double c0 = thread_cpu();
      auto d = ptk::json::parse(line, jsonl);
      auto messages = ptk::tokenizer::parse_messages(d["messages"], "messages");
      double c1 = thread_cpu();
      texts.push_back(tok.render_chat_text(messages));
      double c2 = thread_cpu();
      parse_cpu += c1 - c0;
      render_cpu += c2 - c1;
      text_bytes += static_cast<int64_t>(texts.back().size());
      if (texts.size() == 8192) flush();
    }
    if (!texts.empty()) flush();
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::printf("raw encode_batch: %lld tokens, %.1f MiB rendered text in %.1f s (%.1f CPU s): %.0f tokens/s, %.2f MiB/s\n",
              static_cast<long long>(raw_tokens), text_bytes / 1048576.0, encode_s, encode_cpu, raw_tokens / encode_s,
              text_bytes / 1048576.0 / encode_s);
  std::printf("untimed in the raw figure, one thread: chat rendering %.1f CPU s, JSON parse %.1f CPU s\n", render_cpu,
              parse_cpu);
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
  // Rendering counted in the baseline: CPU time exactly (encode + render); wall as if rendering ran on
  // every core (%d) alongside encoding.
  std::printf("ratio with rendering in the baseline (render + encode_batch): %.2f wall (render spread over %d cores), "
              "%.2f CPU time (raw %.1f CPU s)\n",
              (encode_s + render_cpu / cores) / pr.seconds, cores, (encode_cpu + render_cpu) / pr.cpu,
              encode_cpu + render_cpu);
  std::fflush(stdout);

  // 3b. Optionally the same prepare with another binary (e.g. the previous commit's): its time beside
  // this one's, and whether the two folders hold the same bytes (they must: prepare is deterministic).
  const std::string before = arg(argc, argv, "--ptk-before", "");
  if (!before.empty()) {
    const std::string before_dir = work + "/prepared-before";
    auto b = run_child({before, "prepare", "--tokenizer", tok_dir, "tokenizer.chat_template=qwen2.5", "--input", jsonl,
                        "--output", before_dir, "--format", "sft", "--max-seq-len", max_len, "--force", "--quiet"});
    if (b.code != 0) {
      std::printf("--ptk-before prepare failed with exit code %d\n", b.code);
      return 1;
    }
    int files = 0, differ = 0;
    for (const auto& e : fs::directory_iterator(out_dir)) {
      ++files;
      std::string other = before_dir + "/" + e.path().filename().string();
      if (!ptk::path_exists(other) || !same_bytes(e.path().string(), other)) {
        ++differ;
        std::printf("  differs: %s\n", e.path().filename().string().c_str());
      }
    }
    for (const auto& e : fs::directory_iterator(before_dir))
      if (!ptk::path_exists(out_dir + "/" + e.path().filename().string())) ++differ;
    std::printf("ptk prepare (--ptk-before %s): %.1f s wall, %.1f CPU s, peak RSS %.0f MiB; this binary / before: "
                "%.2f wall, %.2f CPU; output: %d files, %s\n",
                before.c_str(), b.seconds, b.cpu, b.peak_rss / 1048576.0, pr.seconds / b.seconds, pr.cpu / b.cpu, files,
                differ == 0 ? "identical bytes" : "DIFFERENT BYTES");
    fs::remove_all(before_dir);
    std::fflush(stdout);
    if (differ != 0) return 1;
  }

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
