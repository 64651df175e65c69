// lora_rollout_bench: what GRPO's in-process rollouts cost with LoRA (issue 28). The rollout engine
// generates the same work (P prompts x G samples, fixed lengths, one thread unless --threads) from
//   plain    the base model alone (no adapters): the floor;
//   live     the base + LoRA adapters (rank R on every linear, B nonzero as after training), applied
//            on top of each linear's packed base product on every decode step (what GRPO runs);
//   merged   Lora::merged(base): W + s·BA, no adapters (what merging per policy update would run),
// and prints generated tokens/s, the share of decode time, and what a refresh per policy update
// costs each way: live = nothing (the engine keeps the base's packed copies between calls,
// EngineOptions::keep_packed); merged = merging the adapters into new weights + repacking them.
// Same process, interleaved rounds (--rounds), median per variant. Prints figures; never fails on time.
//
//   build/bench/lora_rollout_bench [--shape small|0.5b] [--rank R] [--prompts P] [--samples G]
//                                  [--tokens N] [--slots S] [--rounds K] [--threads T]
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "core/checkpoint/hf_config.h"
#include "core/model/lora.h"
#include "core/model/packed_linear.h"
#include "core/model/qwen2.h"
#include "rollout/engine.h"

namespace ptk {
namespace {

using bench::Clock;
using bench::seconds_since;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace
}  // namespace ptk

int main(int argc, char** argv) {
  using namespace ptk;
  std::string shape = "small";
  int64_t rank = 16, prompts = 8, samples = 8, tokens = 64, slots = 64, rounds = 3, threads = 1;
  for (int i = 1; i < argc; ++i) {
    auto next = [&](const char* name) -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    std::string a = argv[i];
    if (a == "--shape") shape = next("--shape");
    else if (a == "--rank") rank = std::stoll(next("--rank"));
    else if (a == "--prompts") prompts = std::stoll(next("--prompts"));
    else if (a == "--samples") samples = std::stoll(next("--samples"));
    else if (a == "--tokens") tokens = std::stoll(next("--tokens"));
    else if (a == "--slots") slots = std::stoll(next("--slots"));
    else if (a == "--rounds") rounds = std::stoll(next("--rounds"));
    else if (a == "--threads") threads = std::stoll(next("--threads"));
    else {
      std::fprintf(stderr, "usage: lora_rollout_bench [--shape small|0.5b] [--rank R] [--prompts P] [--samples G] "
                           "[--tokens N] [--slots S] [--rounds K] [--threads T]\n");
      return 2;
    }
  }
  at::set_num_threads(static_cast<int>(threads));
  torch::NoGradGuard ng;
  auto cfg = checkpoint::parse_config(bench::rollout_shape_json(shape), shape);
  model::Qwen2Model base = model::Qwen2Model::from_config(cfg, 1);
  model::Qwen2Model live = base;  // a handle on the same tensors; the adapters go on it only
  model::LoraOptions lo;
  lo.rank = rank;
  lo.alpha = 2.0 * static_cast<double>(rank);
  model::Lora lora = model::Lora::attach(live, lo, 2);
  torch::manual_seed(3);
  for (auto& [name, t] : lora.named_parameters())
    if (name.find("lora_B") != std::string::npos) t.copy_(torch::randn_like(t) * 0.01);
  auto tm = Clock::now();
  model::Qwen2Model merged = lora.merged(live);
  const double merge_s = seconds_since(tm);

  // P prompts of 64..127 tokens, G samples each of exactly `tokens` new tokens (no stop ids).
  std::vector<rollout::Request> reqs;
  for (int64_t p = 0; p < prompts; ++p) {
    rollout::Request q;
    const int64_t n = 64 + (p * 37) % 64;
    for (int64_t t = 0; t < n; ++t) q.prompt.push_back(1000 + (p * 131 + t * 17) % 30000);
    q.samples = samples;
    q.sampling = {1.0, 1.0, 0};
    q.seed = static_cast<uint64_t>(p + 1);
    q.max_new_tokens = tokens;
    reqs.push_back(std::move(q));
  }
  std::printf("lora_rollout_bench: shape %s (%lld layers, hidden %lld), LoRA rank %lld on every linear (%lld "
              "parameters), %lld prompts x %lld samples x %lld tokens, %lld slots, %lld thread(s), load %s\n",
              shape.c_str(), static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(cfg.hidden_size),
              static_cast<long long>(rank), static_cast<long long>(lora.numel()), static_cast<long long>(prompts),
              static_cast<long long>(samples), static_cast<long long>(tokens), static_cast<long long>(slots),
              static_cast<long long>(threads), bench::loadavg().c_str());

  struct Variant {
    const char* name;
    const model::Qwen2Model* m;
    bool keep;
    std::vector<double> tps, decode_s, pack_s;
    std::unique_ptr<rollout::Engine> engine;
  };
  std::vector<Variant> vs;
  vs.push_back({"plain", &base, false, {}, {}, {}, nullptr});
  vs.push_back({"live", &live, true, {}, {}, {}, nullptr});
  vs.push_back({"merged", &merged, false, {}, {}, {}, nullptr});
  for (auto& v : vs) {
    rollout::EngineOptions eo;
    eo.slots = slots;
    eo.keep_packed = v.keep;
    v.engine = std::make_unique<rollout::Engine>(*v.m, eo);
  }
  // The first call of each packs; `live` keeps its copies from then on. Rounds interleave the variants.
  for (int64_t k = 0; k <= rounds; ++k)
    for (auto& v : vs) {
      auto out = v.engine->generate(reqs);
      v.engine->free_cache();
      const auto& st = v.engine->last_stats();
      if (k == 0) {
        std::printf("  %-6s first call: pack %.3f s (%.1f MB), %.1f tokens/s\n", v.name, st.pack_s,
                    static_cast<double>(st.packed_bytes) / 1e6, st.tokens_per_s());
        continue;  // warm-up
      }
      v.tps.push_back(st.tokens_per_s());
      v.decode_s.push_back(st.decode_s);
      v.pack_s.push_back(st.pack_s);
    }
  const double plain = median(vs[0].tps);
  for (auto& v : vs)
    std::printf("  %-6s %8.1f tokens/s (median of %lld; %.2fx plain), decode %.3f s, pack per call %.3f s%s\n",
                v.name, median(v.tps), static_cast<long long>(rounds), median(v.tps) / plain, median(v.decode_s),
                median(v.pack_s), v.keep ? " (kept from the first call)" : "");
  // A refresh per policy update, merged: new weights (W + s·BA) and their packed copies.
  auto tp = Clock::now();
  auto packed = merged.pack_for_decode(true, rollout::EngineOptions{}.pack_max_bytes);
  const double pack_s = seconds_since(tp);
  const double gen_s = static_cast<double>(prompts * samples * tokens) / median(vs[1].tps);
  std::printf("  refresh per policy update: live 0 s (adapters read live, base copies kept); merged %.3f s "
              "(merge %.3f s + pack %.3f s, %.1f MB) = %.1f%% of this generation call (%.2f s live)\n",
              merge_s + pack_s, merge_s, pack_s, static_cast<double>(packed.bytes()) / 1e6,
              100.0 * (merge_s + pack_s) / gen_s, gen_s);
  return 0;
}
