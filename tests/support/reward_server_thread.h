// A reward::RewardServer in-process on a loopback port, serving on its own thread until stop() or
// destruction; the constructor returns once /health answers. Shared by the reward server, client
// and GRPO tests. Test code only.
#pragma once
#include <httplib.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/config/recipe.h"
#include "reward/reward_server.h"

namespace ptk::test {

// The `reward` section from `key.path=value` overrides, on a free port (reward.port=0).
inline reward::RewardSection reward_section(std::vector<std::string> overrides) {
  reward::RewardRecipe r;
  overrides.push_back("reward.port=0");
  config::bind_recipe(config::load_recipe("", overrides), r.sections());
  return r.reward;
}

struct RewardServerThread {
  std::unique_ptr<reward::RewardServer> server;
  std::thread thread;
  int port = 0;
  explicit RewardServerThread(const reward::RewardSection& s, int fixed_port = 0) {
    auto opt = s;
    if (fixed_port) opt.port = fixed_port;
    server = std::make_unique<reward::RewardServer>(opt);
    port = server->bind();
    thread = std::thread([this] { server->serve(); });
    httplib::Client probe("127.0.0.1", port);  // ready when /health answers
    for (int i = 0; i < 500 && !probe.Get("/health"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ~RewardServerThread() { stop(); }
  void stop() {
    if (!server) return;
    server->stop();
    thread.join();
    server.reset();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port); }
};

}  // namespace ptk::test
