// reward_bench: load on `ptk reward-server`'s code over loopback — N concurrent clients x M
// requests of K queries each against an in-process RewardServer with a reward model — reporting
// requests/s, items/s, p50/p99 latency, errors, and the server's batch sizes; every answer is
// checked against the score of its text computed alone (zero lost, duplicated or misrouted
// answers). Prints figures; never fails on time.
//
//   build-rw/bench/reward_bench [--model DIR] [--clients N] [--requests M] [--items K]
//                               [--max-wait-ms W] [--threads T]
//
// --model defaults to runs/rm/final (recipes/tiny/rm.json); without it a random tiny reward model
// (recipes/tiny/model.json's shape, byte tokenizer) is written to a temporary folder.
#include <httplib.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "core/checkpoint/hf_config.h"
#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "reward/reward_server.h"

namespace ptk {
namespace {

std::string arg(int argc, char** argv, const std::string& name, const std::string& def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return argv[i + 1];
  return def;
}

int run(int argc, char** argv) {
  std::string model = arg(argc, argv, "--model", "runs/rm/final");
  const int clients = std::stoi(arg(argc, argv, "--clients", "16"));
  const int requests = std::stoi(arg(argc, argv, "--requests", "20"));
  const int items = std::stoi(arg(argc, argv, "--items", "8"));
  const std::string wait = arg(argc, argv, "--max-wait-ms", "5");
  const int threads = std::stoi(arg(argc, argv, "--threads", "0"));
  if (threads > 0) at::set_num_threads(threads);
  std::string tmp;
  if (!path_exists(model + "/config.json")) {
    tmp = "/tmp/ptk_reward_bench_" + std::to_string(getpid());
    tasks::write_byte_tokenizer(tmp);
    auto cfg = checkpoint::read_config("recipes/tiny/model.json");
    auto m = model::Qwen2Model::from_config(cfg, 1);
    m.add_score_head(2, 256);
    checkpoint::SaveOptions so;
    so.source_dir = tmp;
    m.save_pretrained(tmp, so);
    model = tmp;
    std::printf("no reward model at --model; using a random tiny one (recipes/tiny/model.json shape)\n");
  }
  // Reference scores, one text at a time, before the server starts.
  auto ref_model = model::Qwen2Model::from_pretrained(model);
  auto tok = tokenizer::Tokenizer::load(model);
  auto text = [](int c, int r, int i) {
    return "<|im_start|>user\nWhat is " + std::to_string(c * 7 + i) + " + " + std::to_string(r) +
           "?<|im_end|>\n<|im_start|>assistant\nThe answer is " + std::to_string(c * 7 + i + r * 3) + ".<|im_end|>\n";
  };
  std::vector<std::vector<std::vector<double>>> want(clients, std::vector<std::vector<double>>(requests));
  {
    torch::NoGradGuard ng;
    for (int c = 0; c < clients; ++c)
      for (int r = 0; r < requests; ++r)
        for (int i = 0; i < items; ++i) {
          auto ids = tok.encode(text(c, r, i));
          std::vector<int64_t> v(ids.begin(), ids.end());
          model::ForwardOptions fo;
          fo.logits = false;
          auto h = ref_model.forward({torch::tensor(v, torch::kInt64).unsqueeze(0), {}, {}, {}}, fo).hidden;
          want[c][r].push_back(
              ref_model.score(h, torch::tensor({static_cast<int64_t>(v.size()) - 1}, torch::kInt64)).item<double>());
        }
  }
  reward::RewardRecipe recipe;
  config::bind_recipe(config::load_recipe("", {"reward.model=" + model, "reward.port=0", "reward.max_wait_ms=" + wait,
                                               "reward.http_threads=" + std::to_string(clients + 2)}),
                      recipe.sections());
  reward::RewardServer server(recipe.reward);
  int port = server.bind();
  std::thread serving([&] { server.serve(); });
  {
    httplib::Client probe("127.0.0.1", port);  // start the clock once the server answers
    for (int i = 0; i < 500 && !probe.Get("/health"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::atomic<int> errors{0}, wrong{0};
  std::vector<std::vector<double>> lat(clients);
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c) {
    ts.emplace_back([&, c] {
      httplib::Client cli("127.0.0.1", port);
      cli.set_keep_alive(true);
      cli.set_read_timeout(120, 0);
      for (int r = 0; r < requests; ++r) {
        std::string body = "{\"query\": [";
        for (int i = 0; i < items; ++i) {
          rapidjson::Value s;
          std::string t = text(c, r, i);
          rapidjson::Document d;
          s.SetString(t.c_str(), static_cast<rapidjson::SizeType>(t.size()), d.GetAllocator());
          body += (i ? "," : "") + json::to_string(s);
        }
        body += "]}";
        auto s0 = std::chrono::steady_clock::now();
        auto res = cli.Post("/get_reward", body, "application/json");
        lat[c].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count());
        if (!res || res->status != 200) {
          ++errors;
          continue;
        }
        auto d = json::parse(res->body, "answer");
        if (d["rewards"].Size() != static_cast<rapidjson::SizeType>(items)) {
          ++wrong;
          continue;
        }
        for (int i = 0; i < items; ++i)
          if (std::abs(d["rewards"][i].GetDouble() - want[c][r][i]) > 1e-4) ++wrong;
      }
    });
  }
  for (auto& t : ts) t.join();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  httplib::Client cli("127.0.0.1", port);
  std::string metrics = cli.Get("/metrics")->body;
  server.stop();
  serving.join();
  if (!tmp.empty()) std::system(("rm -rf " + tmp).c_str());
  std::vector<double> all;
  for (auto& l : lat) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  auto pct = [&](double p) { return all[std::min(all.size() - 1, static_cast<size_t>(p * all.size()))]; };
  const double total = static_cast<double>(clients) * requests;
  std::printf("reward_bench: %d clients x %d requests x %d items, max_wait_ms %s, %d torch threads\n", clients,
              requests, items, wait.c_str(), at::get_num_threads());
  std::printf("  %.1f requests/s, %.1f items/s, latency p50 %.1f ms, p99 %.1f ms; errors %d; wrong/lost answers %d\n",
              total / secs, total * items / secs, pct(0.5), pct(0.99), errors.load(), wrong.load());
  std::printf("  server /metrics: %s\n", metrics.c_str());
  return errors || wrong ? 1 : 0;
}

}  // namespace
}  // namespace ptk

int main(int argc, char** argv) {
  try {
    return ptk::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "reward_bench: %s\n", e.what());
    return 1;
  }
}
