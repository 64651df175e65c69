// Training-step throughput at the Qwen2.5-0.5B shape on CPU: forward + fused lm_head loss + backward
// + AdamW, tokens/s and GFLOP/s against the fp32 matmul peak of the same LibTorch measured in the
// same run (the best of short bursts, and sustained 2048^3 GEMMs in windows around the timed steps),
// then a per-phase profile of one more step. Prints figures; never fails on time.
//
//   ninja -C build-shapes train_step_bench && build-shapes/bench/train_step_bench [--seq 1024]
//       [--steps 2] [--layers 24] [--checkpointing] [--no-profile] [--chunk-mib N | --chunk-rows N]
// --chunk-mib / --chunk-rows set the fused lm_head op's chunk (LogProbOptions::chunk_bytes /
// chunk_rows; default: the op's own default) to compare chunk sizes on the same binary.
// --lm-head-sweep 64,128,256 times only the fused lm_head op (forward + backward of -mean log-prob
// over T-1 rows at the 0.5B shape) for each chunk size in MiB, alternated over --steps rounds in one
// process (fairer than separate runs on a shared machine), then exits.
// --attention-sweep 64,128,f48,f96 likewise times only the float32 attention (forward + backward of
// the 24 layers' attention at the 0.5B heads, D 64): N = causal_block_attention with blocks of N
// query positions, fN = causal_flash_attention with blocks of N query rows, then exits.
// --lora R trains LoRA adapters of rank R on all seven linears of every layer instead (alpha 2R, the
// base frozen: model.lora.enabled=true's setup, core/train/stage_setup.cpp make_trainable); model FLOPs
// per token then count 4N for the frozen base (no weight gradients) + 6N_lora.
// --compare-lora ROUNDS runs full fine-tuning and --lora 16 (or --lora R given with it) alternately in
// ROUNDS pairs of child processes of this binary (the same --seq/--steps/--layers/--checkpointing), and
// prints tokens/s and peak RSS (the child's VmHWM) side by side with their ratio. Peak RSS is per process,
// hence children; alternating spreads the shared machine's load over both.
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sys/resource.h>
#include <string>
#include <vector>

#include <absl/strings/str_split.h>

#include "core/kernels/cpu/causal_attention.h"
#include "core/model/lm_head_logprobs.h"
#include "core/model/lora.h"
#include "core/model/qwen2.h"
#include "core/optim/adamw.h"
#include "core/runtime/cpu_allocator.h"
#include "core/runtime/runtime.h"
#include "tests/shapes/qwen25_05b.h"
#include "bench/bench_util.h"

namespace {

using ptk::bench::Clock;
using ptk::bench::loadavg;
using ptk::bench::seconds_since;



// Best-of-`reps` GFLOP/s of one fp32 (m, k) x (k, n) product.
double mm_gflops(int64_t m, int64_t k, int64_t n, int reps) {
  auto a = torch::randn({m, k}), b = torch::randn({k, n});
  auto c = torch::mm(a, b);  // warm-up
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    torch::mm_out(c, a, b);
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * m * k * n / best / 1e9;
}

// Sustained fp32 GEMM throughput: 2048^3 products back to back for about `seconds`, total FLOPs
// over total time. The best-of-5 burst above catches the machine's quietest instants; a step is a
// 20 s average over whatever else the shared machine runs, so the steps are also compared with
// this figure, measured in windows right before, between and after them.
double sustained_gflops(double seconds) {
  auto a = torch::randn({2048, 2048}), b = torch::randn({2048, 2048});
  auto c = torch::mm(a, b);
  int64_t n = 0;
  auto t0 = Clock::now();
  do {
    torch::mm_out(c, a, b);
    ++n;
  } while (seconds_since(t0) < seconds);
  return 2.0 * 2048 * 2048 * 2048 * n / seconds_since(t0) / 1e9;
}

struct Phases {
  double forward = 0, loss = 0, backward = 0, optimizer = 0;
  double sys_s = 0;         // kernel CPU time of the process (all threads), mostly page faults
  int64_t minor_faults = 0;
  int64_t alloc_misses = 0, alloc_unmapped = 0;  // runtime/cpu_allocator.h: blocks mapped / unmapped
  double total() const { return forward + loss + backward + optimizer; }
};

// Self time per (scope, op) from the legacy profiler's push/pop ranges of every thread.
std::map<std::string, double> self_times(const torch::autograd::profiler::thread_event_lists& lists) {
  std::map<std::string, double> out;
  for (const auto& events : lists) {
    struct Open {
      std::string name;
      double start, children;
    };
    std::vector<Open> stack;
    for (const auto& e : events) {
      const std::string kind = e.kindStr();
      if (kind == "push") {
        stack.push_back({e.name(), e.cpuUs(), 0.0});
      } else if (kind == "pop" && !stack.empty()) {
        Open o = stack.back();
        stack.pop_back();
        double dur = e.cpuUs() - o.start;
        if (!stack.empty()) stack.back().children += dur;
        // Key: the innermost ptk:: scope or autograd node around (or at) this range, then the op.
        std::string key;
        for (auto it = stack.rbegin(); it != stack.rend() && key.empty(); ++it) {
          if (it->name.rfind("ptk::", 0) == 0) key = it->name + " / " + o.name;
          static const std::string kEval = "autograd::engine::evaluate_function: ";
          if (it->name.rfind(kEval, 0) == 0) key = "backward / " + it->name.substr(kEval.size());
        }
        if (key.empty()) {
          static const std::string kEval = "autograd::engine::evaluate_function: ";
          key = o.name.rfind(kEval, 0) == 0 ? "backward / " + o.name.substr(kEval.size())
                : o.name.rfind("ptk::", 0) == 0 ? o.name + " / (self)"
                                                 : "other / " + o.name;
        }
        out[key] += (dur - o.children) / 1e6;
      }
    }
  }
  return out;
}

// The fused lm_head op alone, forward + backward, at each chunk size (MiB), alternated `rounds` times.
void lm_head_sweep(const std::vector<int64_t>& mibs, int64_t rows, int64_t hdim, int64_t vocab, int64_t rounds,
                   double peak) {
  torch::manual_seed(0);
  auto hidden = (torch::randn({rows, hdim}) * 0.1).requires_grad_(true);
  auto weight = (torch::randn({vocab, hdim}) * 0.02).requires_grad_(true);
  auto targets = torch::randint(0, vocab, {rows}, torch::kInt64);
  const double flops = 4.0 * 2.0 * rows * hdim * vocab;  // forward GEMM, its recompute, dh and dW
  std::map<int64_t, std::vector<double>> times;
  for (int64_t r = 0; r <= rounds; ++r) {  // round 0 is a warm-up
    for (int64_t mib : mibs) {
      ptk::model::LogProbOptions o;
      o.chunk_bytes = mib << 20;
      hidden.mutable_grad().reset();
      weight.mutable_grad().reset();
      auto t0 = Clock::now();
      auto lp = ptk::model::lm_head_logprobs(hidden, weight, targets, o);
      (-lp.logprobs.mean()).backward();
      double t = seconds_since(t0);
      if (r > 0) times[mib].push_back(t);
    }
  }
  std::printf("fused lm_head op alone: %lld rows x %lld hidden x %lld vocab, forward + backward, %lld rounds\n",
              static_cast<long long>(rows), static_cast<long long>(hdim), static_cast<long long>(vocab),
              static_cast<long long>(rounds));
  for (auto& [mib, v] : times) {
    std::sort(v.begin(), v.end());
    const int64_t chunk_rows = std::max<int64_t>(1, (mib << 20) / (vocab * 4));
    std::printf("RESULT chunk %4lld MiB (%4lld rows): best %.2f s, median %.2f s | %.1f GFLOP/s = %.1f%% of peak\n",
                static_cast<long long>(mib), static_cast<long long>(chunk_rows), v.front(), v[v.size() / 2],
                flops / v.front() / 1e9, 100.0 * flops / v.front() / 1e9 / peak);
  }
}

// The attention alone: q (1, heads, T, D), k/v (1, kv, T, D), forward + backward once per layer,
// for each kernel ("128": causal_block_attention, block of 128 positions; "f48":
// causal_flash_attention, block of 48 rows), alternated `rounds` times.
void attention_sweep(const std::vector<std::string>& kernels, int64_t T, int64_t heads, int64_t kv, int64_t d,
                     int64_t layers, int64_t rounds, double peak) {
  torch::manual_seed(0);
  auto q = torch::randn({1, heads, T, d}).requires_grad_(true);
  auto k = torch::randn({1, kv, T, d}).requires_grad_(true), v = torch::randn({1, kv, T, d}).requires_grad_(true);
  auto dout = torch::randn({1, heads, T, d});
  // Model FLOPs of causal attention (QK^T and PV over the T (T + 1) / 2 visible pairs, x3 for
  // backward), as the step's GFLOP/s counts them.
  const double flops = 3.0 * 2.0 * 2.0 * heads * d * T * (T + 1) / 2.0 * layers;
  std::map<std::string, std::vector<double>> times;
  for (int64_t r = 0; r <= rounds; ++r) {  // round 0 is a warm-up
    for (const std::string& kernel : kernels) {
      const bool flash = !kernel.empty() && kernel[0] == 'f';
      const int64_t b = std::stoll(flash ? kernel.substr(1) : kernel);
      auto t0 = Clock::now();
      for (int64_t l = 0; l < layers; ++l) {
        q.mutable_grad().reset();
        k.mutable_grad().reset();
        v.mutable_grad().reset();
        (flash ? ptk::kernels::cpu::causal_flash_attention(q, k, v, b) : ptk::kernels::cpu::causal_block_attention(q, k, v, b))
            .backward(dout);
      }
      if (r > 0) times[kernel].push_back(seconds_since(t0));
    }
  }
  std::printf("attention alone: %lld layers x (%lld heads / %lld K/V heads, T %lld, D %lld), forward + backward, "
              "%lld rounds (N: causal_block_attention, N positions a block; fN: causal_flash_attention, N rows)\n",
              static_cast<long long>(layers), static_cast<long long>(heads), static_cast<long long>(kv),
              static_cast<long long>(T), static_cast<long long>(d), static_cast<long long>(rounds));
  for (auto& [kernel, t] : times) {
    std::sort(t.begin(), t.end());
    std::printf("RESULT %-6s: best %.3f s, median %.3f s | %.1f GFLOP/s = %.1f%% of peak\n", kernel.c_str(),
                t.front(), t[t.size() / 2], flops / t.front() / 1e9, 100.0 * flops / t.front() / 1e9 / peak);
  }
}

// "f48,128" -> {"f48", "128"} (empty items dropped)
std::vector<std::string> str_list(const std::string& list) { return absl::StrSplit(list, ',', absl::SkipEmpty()); }

// "64,128,256" -> {64, 128, 256}
std::vector<int64_t> int_list(const std::string& list) {
  std::vector<int64_t> out;
  for (const std::string& item : str_list(list)) out.push_back(std::stoll(item));
  return out;
}


// This process's peak resident set (VmHWM of /proc/self/status), bytes; -1 when unreadable.
double peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;
  return -1;
}

// The value after `key` on the child's "RESULT ..." lines; NaN when absent.
double result_field(const std::string& out, const std::string& key) {
  const auto at = out.find(key);
  if (at == std::string::npos) return std::nan("");
  return std::stod(out.substr(at + key.size()));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? std::nan("") : v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// --compare-lora: full and LoRA children alternated `rounds` times; prints both and the ratio.
int compare_lora(const std::string& self, const std::string& common, int64_t rank, int64_t rounds) {
  struct Mode {
    std::string name, flags;
    std::vector<double> tok_s, rss;
  };
  std::vector<Mode> modes{{"full fine-tuning", "", {}, {}},
                          {"LoRA r" + std::to_string(rank) + " all-linear", " --lora " + std::to_string(rank), {}, {}}};
  for (int64_t r = 0; r < rounds; ++r) {
    for (auto& m : modes) {
      const std::string cmd = self + common + m.flags + " --no-profile 2>&1";
      std::FILE* f = ::popen(cmd.c_str(), "r");
      if (!f) {
        std::fprintf(stderr, "cannot run %s\n", cmd.c_str());
        return 1;
      }
      std::string out;
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
      const int rc = ::pclose(f);
      const double tok = result_field(out, "RESULT tokens/s "), rss = result_field(out, "RESULT peak RSS ");
      if (rc != 0 || std::isnan(tok) || std::isnan(rss)) {
        std::fprintf(stderr, "child `%s` failed (status %d):\n%s\n", cmd.c_str(), rc, out.c_str());
        return 1;
      }
      m.tok_s.push_back(tok);
      m.rss.push_back(rss);
      std::printf("round %lld, %-24s %7.1f tokens/s, peak RSS %6.2f GiB | load %s\n", static_cast<long long>(r + 1),
                  m.name.c_str(), tok, rss / 1024.0, loadavg().c_str());
      std::fflush(stdout);
    }
  }
  std::printf("\n%-26s %-30s %-26s\n", "", "tokens/s (median; min-max)", "peak RSS (median; min-max)");
  for (auto& m : modes) {
    std::printf("%-26s %7.1f (%.1f-%.1f)            %6.2f GiB (%.2f-%.2f)\n", m.name.c_str(), median(m.tok_s),
                *std::min_element(m.tok_s.begin(), m.tok_s.end()), *std::max_element(m.tok_s.begin(), m.tok_s.end()),
                median(m.rss) / 1024.0, *std::min_element(m.rss.begin(), m.rss.end()) / 1024.0,
                *std::max_element(m.rss.begin(), m.rss.end()) / 1024.0);
  }
  std::printf("RESULT LoRA / full: tokens/s x%.2f, peak RSS x%.2f (%.2f GiB less) | %lld rounds\n",
              median(modes[1].tok_s) / median(modes[0].tok_s), median(modes[1].rss) / median(modes[0].rss),
              (median(modes[0].rss) - median(modes[1].rss)) / 1024.0, static_cast<long long>(rounds));
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  int64_t T = 1024, steps = 2, layers = 24;
  bool checkpointing = false, profile = true;
  int64_t lora_rank = 0, compare_rounds = 0;
  std::string common;  // the flags --compare-lora passes on to its children
  std::vector<int64_t> sweep_mib;
  std::vector<std::string> sweep_kernels;
  ptk::model::LogProbOptions lp_options;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seq" && i + 1 < argc) T = std::stoll(argv[++i]), common += " --seq " + std::to_string(T);
    else if (a == "--steps" && i + 1 < argc) steps = std::stoll(argv[++i]), common += " --steps " + std::to_string(steps);
    else if (a == "--layers" && i + 1 < argc) layers = std::stoll(argv[++i]), common += " --layers " + std::to_string(layers);
    else if (a == "--checkpointing") checkpointing = true, common += " --checkpointing";
    else if (a == "--lora" && i + 1 < argc) lora_rank = std::stoll(argv[++i]);
    else if (a == "--compare-lora" && i + 1 < argc) compare_rounds = std::stoll(argv[++i]);
    else if (a == "--no-profile") profile = false;
    else if (a == "--chunk-mib" && i + 1 < argc) lp_options.chunk_bytes = std::stoll(argv[++i]) << 20;
    else if (a == "--chunk-rows" && i + 1 < argc) lp_options.chunk_rows = std::stoll(argv[++i]);
    else if (a == "--lm-head-sweep" && i + 1 < argc) sweep_mib = int_list(argv[++i]);
    else if (a == "--attention-sweep" && i + 1 < argc) sweep_kernels = str_list(argv[++i]);
    else {
      std::fprintf(stderr,
                   "usage: %s [--seq N] [--steps N] [--layers N] [--checkpointing] [--no-profile] "
                   "[--chunk-mib N | --chunk-rows N] [--lm-head-sweep MIB,MIB,...] [--attention-sweep N,fN,...] "
                   "[--lora R] [--compare-lora ROUNDS]\n",
                   argv[0]);
      return 2;
    }
  }
  if (compare_rounds > 0)
    return compare_lora(std::string("'") + argv[0] + "'", common, lora_rank > 0 ? lora_rank : 16, compare_rounds);
  auto info = ptk::runtime::init_and_announce(0);
  std::printf("load average at start: %s\n", loadavg().c_str());

  // fp32 matmul peak of this LibTorch: the step's own GEMM shapes and a square one; the best is the peak.
  auto c = ptk::test::qwen25_05b_config();
  c.num_hidden_layers = layers;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  struct Shape {
    const char* what;
    int64_t m, k, n;
  } shapes[] = {{"T x H . H x I (gate/up)", T, H, I},
                {"T x I . I x H (down)", T, I, H},
                {"T x H . H x 8192 (lm_head chunk)", T, H, 8192},
                {"2048^3", 2048, 2048, 2048}};
  double peak = 0;
  for (const auto& s : shapes) {
    double g = mm_gflops(s.m, s.k, s.n, 5);
    std::printf("  matmul %-34s %8.1f GFLOP/s\n", s.what, g);
    peak = std::max(peak, g);
  }
  std::printf("fp32 matmul peak: %.1f GFLOP/s\n", peak);
  if (!sweep_mib.empty()) {
    lm_head_sweep(sweep_mib, T - 1, H, c.vocab_size, steps, peak);
    std::printf("load average at end: %s\n", loadavg().c_str());
    return 0;
  }
  if (!sweep_kernels.empty()) {
    attention_sweep(sweep_kernels, T, c.num_attention_heads, c.num_key_value_heads, c.head_dim, layers, steps, peak);
    std::printf("load average at end: %s\n", loadavg().c_str());
    return 0;
  }

  auto m = ptk::model::Qwen2Model::from_config(c, 1);
  int64_t n_params = 0;
  for (const auto& [n, t] : m.named_parameters()) n_params += t.numel();
  std::shared_ptr<ptk::model::Lora> lora;
  double trained = static_cast<double>(n_params), base_factor = 6.0;
  if (lora_rank > 0) {
    m.set_requires_grad(false);  // the base: frozen, as make_trainable does
    ptk::model::LoraOptions lo;
    lo.rank = lora_rank;
    lo.alpha = 2.0 * static_cast<double>(lora_rank);
    lora = std::make_shared<ptk::model::Lora>(ptk::model::Lora::attach(m, lo, 1));
    for (auto& [n, t] : lora->named_parameters()) t.set_requires_grad(true);
    trained = static_cast<double>(lora->numel());
    base_factor = 4.0;
  } else {
    m.set_requires_grad(true);
  }
  ptk::optim::AdamW opt(lora ? lora->named_parameters() : m.named_parameters(), {});
  // Model FLOPs per token: 6N (tied embedding counted once, as the lm_head matmul) + causal
  // attention 6 L T (nh D) (QK^T and AV, forward and backward, half the pairs masked). With LoRA the
  // frozen base costs 4N (no weight gradients) and the adapters 6 N_lora.
  const double flops_per_token = base_factor * n_params + (lora ? 6.0 * trained : 0.0) +
                                 6.0 * c.num_hidden_layers * static_cast<double>(T) * c.num_attention_heads * c.head_dim;
  std::printf("model: %lld layers, %.1fM parameters, sequence %lld, %s; %s; %.3f GFLOP per token\n",
              static_cast<long long>(layers), n_params / 1e6, static_cast<long long>(T),
              checkpointing ? "activation checkpointing" : "no checkpointing",
              lora ? ("LoRA rank " + std::to_string(lora_rank) + " on all linears, " + std::to_string(lora->numel()) +
                      " trained parameters, base frozen").c_str()
                   : "full fine-tuning",
              flops_per_token / 1e9);
  const int64_t vocab = m.lm_head_weight().size(0);
  const int64_t chunk_rows =
      lp_options.chunk_rows > 0 ? lp_options.chunk_rows : std::max<int64_t>(1, lp_options.chunk_bytes / (vocab * 4));
  std::printf("lm_head chunk: %lld rows (%.0f MiB of fp32 logits at vocab %lld)\n", static_cast<long long>(chunk_rows),
              chunk_rows * vocab * 4.0 / (1 << 20), static_cast<long long>(vocab));

  torch::manual_seed(0);
  auto ids = torch::randint(0, 151643, {1, T}, torch::kLong);
  ptk::model::ForwardInput in{ids, {}, {}, {}};
  ptk::model::ForwardOptions fo;
  fo.logits = false;
  fo.activation_checkpointing = checkpointing;
  auto targets = ids[0].narrow(0, 1, T - 1);  // (T-1)

  auto step = [&](Phases* p) {
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    const auto a0 = ptk::runtime::cpu_allocator_stats();
    auto t0 = Clock::now();
    auto hidden = m.forward(in, fo).hidden;  // (1, T, H)
    p->forward += seconds_since(t0);
    t0 = Clock::now();
    at::Tensor loss;
    {
      RECORD_FUNCTION("ptk::lm_head_loss", std::vector<c10::IValue>());
      auto lp = ptk::model::lm_head_logprobs(hidden[0].narrow(0, 0, T - 1), m.lm_head_weight(), targets, lp_options);
      loss = -lp.logprobs.mean();
    }
    p->loss += seconds_since(t0);
    t0 = Clock::now();
    loss.backward();
    p->backward += seconds_since(t0);
    t0 = Clock::now();
    {
      RECORD_FUNCTION("ptk::adamw", std::vector<c10::IValue>());
      opt.step(1e-5);
      opt.zero_grad();
    }
    p->optimizer += seconds_since(t0);
    getrusage(RUSAGE_SELF, &r1);
    const auto a1 = ptk::runtime::cpu_allocator_stats();
    p->alloc_misses += a1.misses - a0.misses;
    p->alloc_unmapped += a1.unmapped - a0.unmapped;
    p->minor_faults += r1.ru_minflt - r0.ru_minflt;
    p->sys_s += (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1e6;
    return loss.item<double>();
  };

  Phases warm;
  double l0 = step(&warm);
  std::printf("warm-up step: %.1f s (loss %.4f), %lld minor page faults, %.1f s system CPU\n", warm.total(), l0,
              static_cast<long long>(warm.minor_faults), warm.sys_s);
  Phases p;
  std::vector<double> windows{sustained_gflops(2.0)};
  for (int64_t s = 0; s < steps; ++s) {
    step(&p);
    windows.push_back(sustained_gflops(2.0));
  }
  double sustained = 0;
  for (double w : windows) sustained += w / windows.size();
  const double per_step = p.total() / steps;
  const double tok_s = T / per_step, gflops = flops_per_token * tok_s / 1e9;
  std::printf("\nstep (mean of %lld): %.2f s = forward %.2f + lm_head loss %.2f + backward %.2f + AdamW %.2f\n",
              static_cast<long long>(steps), per_step, p.forward / steps, p.loss / steps, p.backward / steps,
              p.optimizer / steps);
  std::printf("per step: %lld minor page faults, %.2f s system CPU (all threads), %lld blocks mapped and %lld "
              "unmapped by the CPU allocator\n",
              static_cast<long long>(p.minor_faults / steps), p.sys_s / steps,
              static_cast<long long>(p.alloc_misses / steps), static_cast<long long>(p.alloc_unmapped / steps));
  std::printf("sustained 2048^3 GEMM in %zu 2 s windows around the steps:", windows.size());
  for (double w : windows) std::printf(" %.1f", w);
  std::printf(" GFLOP/s (mean %.1f)\n", sustained);
  std::printf("RESULT tokens/s %.1f | %.1f GFLOP/s | burst peak %.1f GFLOP/s: %.1f%% | sustained peak %.1f GFLOP/s: "
              "%.1f%% | threads %d | load %s\n",
              tok_s, gflops, peak, 100.0 * gflops / peak, sustained, 100.0 * gflops / sustained, info.threads,
              loadavg().c_str());

  if (profile) {
    std::map<std::string, double> self;
    {
      torch::autograd::profiler::TLSLegacyProfilerGuard guard(
          torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::CPU),
          [&](const torch::autograd::profiler::thread_event_lists& lists) { self = self_times(lists); });
      Phases q;
      step(&q);
    }
    double total = 0;
    std::map<std::string, double> by_scope;
    for (const auto& [k, v] : self) {
      total += v;
      by_scope[k.substr(0, k.find(" / "))] += v;
    }
    auto print_sorted = [&](const std::map<std::string, double>& m, const char* title, size_t top) {
      std::vector<std::pair<double, std::string>> v;
      for (const auto& [k, s] : m) v.push_back({s, k});
      std::sort(v.rbegin(), v.rend());
      std::printf("\n%s (profiled step, self time %.2f s):\n", title, total);
      for (size_t i = 0; i < std::min(top, v.size()); ++i)
        std::printf("  %6.2f s %5.1f%%  %s\n", v[i].first, 100.0 * v[i].first / total, v[i].second.c_str());
    };
    print_sorted(by_scope, "by phase", 20);
    print_sorted(self, "by phase / op", 40);
  }
  std::printf("RESULT peak RSS %.1f MiB (VmHWM)\n", peak_rss_bytes() / (1024.0 * 1024.0));
  std::printf("load average at end: %s\n", loadavg().c_str());
  return 0;
}
