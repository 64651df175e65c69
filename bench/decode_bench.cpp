// decode_bench: the rollout engine against what the device's memory allows, on random weights of a
// shape (bench/shapes/*.json), for scripts/gpu_check.sh (bench/gpu_rollout_bench.py runs it beside
// the plain-PyTorch generate baseline). Not a correctness test; prints figures and never fails on time.
//
//   decode_bench --shape bench/shapes/qwen2.5-1.5b.json [--device cuda|cpu] [--dtype bf16|fp32]
//                [--decode-tokens 512] [--prompts 64 --samples 8 --new-tokens 512 --prompt-len 64]
//                [--copy-mib 1024] [--no-batch] [--no-decode] [--prompts-out FILE] [--json FILE] [--seed S]
//
// 1. copy rate: a device-to-device at::Tensor::copy_ of --copy-mib MiB (cudaMemcpyAsync on CUDA),
//    synced, best of 5; counted as read + write (2 x bytes / s, as CUDA's bandwidthTest counts it).
// 2. the bound at batch 1: every weight is read once per decode step (the tied embedding once, as the
//    LM head; the KV cache of a few hundred tokens is < 1% of the weights and not counted), so
//    tokens/s <= copy rate / weight bytes.
// 3. decode at batch 1: one sample, a 16-token prompt, --decode-tokens new tokens, no stop id,
//    temperature 1, after a short warm-up generation; tokens/s and its ratio to the bound.
// 4. a GRPO-sized batch: --prompts random prompts (lengths --prompt-len/2 .. --prompt-len) x
//    --samples samples x --new-tokens new tokens, no stop, temperature 1, all samples in flight at
//    once (slots = prompts x samples); --prompts-out writes the prompts (token ids) for the baseline.
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "core/checkpoint/hf_config.h"
#include "core/model/qwen2.h"
#include "core/runtime/device.h"
#include "core/runtime/runtime.h"
#include "core/util/fs.h"
#include "rollout/engine.h"

namespace ptk {
namespace {

using bench::Clock;
using bench::seconds_since;

std::string arg(int argc, char** argv, const std::string& name, const std::string& def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == "--" + name) return argv[i + 1];
  return def;
}
bool flag(int argc, char** argv, const std::string& name) {
  for (int i = 1; i < argc; ++i)
    if (argv[i] == "--" + name) return true;
  return false;
}

void sync(const at::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.has_index() ? d.index() : -1);
}

// Bytes moved per second (read + write) by a copy of `mib` MiB on `d`: the best of 5 timed copies.
double copy_rate(const at::Device& d, int64_t mib) {
  const int64_t n = mib << 20;
  auto src = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(d));
  auto dst = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(d));
  src.fill_(1);
  dst.copy_(src);  // warm-up: first-touch pages, the copy kernel's set-up
  sync(d);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    dst.copy_(src);
    sync(d);
    best = std::min(best, seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n) / best;
}

double weight_bytes(const model::Qwen2Model& m) {
  double b = 0;
  for (const auto& [name, t] : m.named_parameters()) b += static_cast<double>(t.numel()) * static_cast<double>(t.element_size());
  return b;
}

rollout::EngineOptions engine_options(int64_t slots, int64_t vocab) {
  rollout::EngineOptions eo;
  eo.slots = slots;
  eo.vocab_limit = vocab;
  // ENGINE BRANCH: once it is merged its defaults apply here (EngineOptions::device_loop = kAuto, the
  // device-resident loop on CUDA; cuda_graphs = true). To pin them, switch on this line:
  // eo.device_loop = rollout::DeviceLoopMode::kOn; eo.cuda_graphs = true;
  return eo;
}

std::vector<int64_t> random_ids(std::mt19937_64& rng, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int64_t> tok(0, vocab - 1);
  std::vector<int64_t> ids(n);
  for (auto& x : ids) x = tok(rng);
  return ids;
}

}  // namespace
}  // namespace ptk

namespace ptk {
namespace {
int run(int argc, char** argv);
}
}  // namespace ptk

int main(int argc, char** argv) {
  try {
    return ptk::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "decode_bench: error: %s\n", e.what());
    return 1;
  }
}

namespace ptk {
namespace {

int run(int argc, char** argv) {
  const std::string shape = arg(argc, argv, "shape", "");
  if (shape.empty() || !path_exists(shape)) {
    std::fprintf(stderr, "decode_bench: --shape <config.json> (e.g. bench/shapes/qwen2.5-1.5b.json) is required\n");
    return 2;
  }
  runtime::init_and_announce(std::stoi(arg(argc, argv, "threads", "0")));
  torch::NoGradGuard no_grad;
  const at::Device dev = runtime::resolve_device(arg(argc, argv, "device", "auto"), "--device");
  const std::string dt = arg(argc, argv, "dtype", dev.is_cuda() ? "bf16" : "fp32");
  const at::ScalarType dtype = dt == "bf16" ? at::kBFloat16 : at::kFloat;
  const int64_t decode_tokens = std::stoll(arg(argc, argv, "decode-tokens", "512"));
  const int64_t P = std::stoll(arg(argc, argv, "prompts", "64")), G = std::stoll(arg(argc, argv, "samples", "8"));
  const int64_t new_tokens = std::stoll(arg(argc, argv, "new-tokens", "512"));
  const int64_t prompt_len = std::max<int64_t>(2, std::stoll(arg(argc, argv, "prompt-len", "64")));
  const uint64_t seed = std::stoull(arg(argc, argv, "seed", "1"));

  auto cfg = checkpoint::read_config(shape);
  model::LoadOptions lo;
  lo.dtype = dtype;
  lo.device = dev;
  auto t_init = Clock::now();
  auto m = model::Qwen2Model::from_config(cfg, seed, lo);
  sync(dev);
  const double init_s = seconds_since(t_init);
  const double wbytes = weight_bytes(m);
  const int64_t vocab = cfg.vocab_size;
  std::string json = "{\"shape\": \"" + shape + "\", \"device\": \"" + runtime::device_name(dev) + "\", \"dtype\": \"" +
                     dt + "\", \"weight_bytes\": " + std::to_string(wbytes);
  std::vector<std::string> summary;
  char line[512];
  std::snprintf(line, sizeof line, "shape %s: %.0fM parameters, %s on %s, weights %.3f GB (random init %.1f s)",
                shape.c_str(), wbytes / at::elementSize(dtype) / 1e6, dt.c_str(), runtime::device_name(dev).c_str(),
                wbytes / 1e9, init_s);
  summary.push_back(line);

  if (!flag(argc, argv, "no-decode")) {
    const double rate = copy_rate(dev, std::stoll(arg(argc, argv, "copy-mib", dev.is_cuda() ? "1024" : "256")));
    const double bound = rate / wbytes;
    std::mt19937_64 rng(seed);
    rollout::Engine eng(m, engine_options(1, vocab));
    rollout::Request q;
    q.prompt = random_ids(rng, 16, vocab);
    q.samples = 1;
    q.sampling = {1.0, 1.0, 0};
    q.seed = seed;
    q.max_new_tokens = std::min<int64_t>(32, decode_tokens);
    eng.generate({q});  // warm-up: kernels, the cache, the allocator
    q.max_new_tokens = decode_tokens;
    eng.generate({q});
    const auto& st = eng.last_stats();
    const double tps = st.tokens_per_s();
    const double decode_tps = st.decode_s > 0 ? static_cast<double>(st.decode_steps) / st.decode_s : 0.0;
    std::snprintf(line, sizeof line,
                  "copy rate %.1f GB/s (device-to-device copy_, read + write) -> bound %.1f tokens/s at batch 1 "
                  "(weight bytes / rate)", rate / 1e9, bound);
    summary.push_back(line);
    std::snprintf(line, sizeof line,
                  "decode batch 1: %lld tokens in %.3f s = %.1f tokens/s = %.1f%% of the bound (goal >= 60%%); "
                  "decode steps alone %.1f steps/s",
                  static_cast<long long>(st.generated_tokens), st.total_s, tps, 100.0 * tps / bound, decode_tps);
    summary.push_back(line);
    json += ", \"copy_bytes_per_s\": " + std::to_string(rate) + ", \"bound_tokens_per_s\": " + std::to_string(bound) +
            ", \"decode_tokens\": " + std::to_string(st.generated_tokens) + ", \"decode_s\": " + std::to_string(st.total_s) +
            ", \"decode_tokens_per_s\": " + std::to_string(tps) + ", \"decode_fraction_of_bound\": " +
            std::to_string(tps / bound);
  }

  if (!flag(argc, argv, "no-batch")) {
    std::mt19937_64 rng(seed + 1);
    std::uniform_int_distribution<int64_t> len(prompt_len / 2, prompt_len);
    std::vector<rollout::Request> reqs;
    for (int64_t i = 0; i < P; ++i) {
      rollout::Request q;
      q.prompt = random_ids(rng, len(rng), vocab);
      q.samples = G;
      q.sampling = {1.0, 1.0, 0};
      q.seed = seed * 1000003ull + static_cast<uint64_t>(i);
      q.max_new_tokens = new_tokens;
      reqs.push_back(std::move(q));
    }
    const std::string out = arg(argc, argv, "prompts-out", "");
    if (!out.empty()) {
      std::string pj = "{\"samples\": " + std::to_string(G) + ", \"new_tokens\": " + std::to_string(new_tokens) +
                       ", \"prompts\": [";
      for (size_t i = 0; i < reqs.size(); ++i) {
        pj += i ? ",\n[" : "\n[";
        for (size_t t = 0; t < reqs[i].prompt.size(); ++t) pj += (t ? "," : "") + std::to_string(reqs[i].prompt[t]);
        pj += "]";
      }
      pj += "]}\n";
      write_file_atomic(out, pj);
    }
    rollout::Engine eng(m, engine_options(P * G, vocab));
    {
      std::vector<rollout::Request> warm(reqs.begin(), reqs.begin() + std::min<int64_t>(2, P));
      for (auto& q : warm) q.max_new_tokens = 8;
      eng.generate(warm);
    }
    eng.generate(reqs);
    const auto& st = eng.last_stats();
    std::snprintf(line, sizeof line,
                  "batch: %lld prompts x %lld samples x %lld new tokens (slots %lld): %lld tokens in %.2f s = %.0f "
                  "tokens/s (prefill %.2f s, decode %.2f s, sampling %.2f s, %lld decode steps)",
                  static_cast<long long>(P), static_cast<long long>(G), static_cast<long long>(new_tokens),
                  static_cast<long long>(st.slots), static_cast<long long>(st.generated_tokens), st.total_s,
                  st.tokens_per_s(), st.prefill_s, st.decode_s, st.sample_s, static_cast<long long>(st.decode_steps));
    summary.push_back(line);
    // The KV cache the batch used, made again after free_cache(): what releasing it before each GRPO
    // update and re-making it for the next generation costs (model::KVCache zero-fills its storage;
    // on CUDA the caching allocator hands back the blocks the freed cache left, unless the update
    // took them).
    eng.free_cache();
    sync(dev);
    const auto t_alloc = Clock::now();
    const int64_t kv_elems = P * G * (prompt_len + new_tokens) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads *
                             cfg.head_dim;
    auto kv = at::zeros({kv_elems}, at::TensorOptions().dtype(dtype).device(dev));
    sync(dev);
    const double alloc_s = seconds_since(t_alloc);
    std::snprintf(line, sizeof line, "KV cache of the batch: %.2f GB, allocated and zeroed again in %.4f s (after free_cache)",
                  static_cast<double>(kv.numel()) * kv.element_size() / 1e9, alloc_s);
    summary.push_back(line);
    json += ", \"batch_prompts\": " + std::to_string(P) + ", \"batch_samples\": " + std::to_string(G) +
            ", \"batch_new_tokens\": " + std::to_string(new_tokens) + ", \"batch_tokens\": " +
            std::to_string(st.generated_tokens) + ", \"batch_s\": " + std::to_string(st.total_s) +
            ", \"batch_tokens_per_s\": " + std::to_string(st.tokens_per_s()) + ", \"kv_alloc_s\": " +
            std::to_string(alloc_s);
  }
  json += "}\n";
  std::printf("=== decode_bench\n");
  for (auto& s : summary) std::printf("  %s\n", s.c_str());
  std::fflush(stdout);
  const std::string jf = arg(argc, argv, "json", "");
  if (!jf.empty()) write_file_atomic(jf, json);
  return 0;
}

}  // namespace
}  // namespace ptk
