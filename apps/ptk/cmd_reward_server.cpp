// `ptk reward-server --recipe FILE [--host H] [--port P] [key.path=value ...]`: serves rewards over
// OpenRLHF's /get_reward protocol (reward/reward_server.h) until SIGTERM or SIGINT.
// Not the server itself: flags, recipe binding, signal handling, the `listening on` line.
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <iostream>
#include <thread>

#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/runtime/device.h"
#include "core/runtime/log.h"
#include "core/runtime/runtime.h"
#include "reward/reward_server.h"
#include "reward/verifiers.h"

namespace ptk::app {

int cmd_reward_server(int argc, char** argv) {
  reward::RewardRecipe recipe;
  cli::CommandLine cl("reward-server", "ptk reward-server --recipe FILE [--host H] [--port P] [--check] [key.path=value ...]",
                      "Serves rewards over HTTP with OpenRLHF's remote reward-model protocol:\n"
                      "  POST /get_reward {\"query\": [prompt+response...], \"prompts\": [...], \"labels\": [...]}\n"
                      "    -> {\"rewards\": [...], \"scores\": [...], \"extra_logs\": {\"rm\": [...], \"<verifier>\": [...]}}\n"
                      "  GET /health, GET /metrics (requests, errors, batch sizes, latency).\n"
                      "rewards = reward.model_weight * reward model score + sum of verifier_weights * verifier.\n"
                      "Prints `listening on http://H:P` when ready; SIGTERM/SIGINT stop it cleanly.");
  cl.flags().add_options()("host", boost::program_options::value<std::string>(),
                           "address to bind (overrides reward.host; default 127.0.0.1)")(
      "port", boost::program_options::value<int>(), "TCP port (overrides reward.port; 0 = any free port)")(
      "device", boost::program_options::value<std::string>(),
      "where the reward model runs (overrides run.device): auto (a GPU when there is one) | cpu | cuda | cuda:N");
  cl.accept_recipe(recipe.sections());
  cl.accept_check();
  if (!cl.parse(argc, argv)) return 0;
  auto overrides = cl.overrides();
  if (cl.has("host")) overrides.push_back("reward.host=" + cl.get<std::string>("host"));
  if (cl.has("port")) overrides.push_back("reward.port=" + std::to_string(cl.get<int>("port")));
  if (cl.has("device")) overrides.push_back("run.device=" + cl.get<std::string>("device"));
  auto json = config::load_recipe(cl.recipe(), overrides);
  config::bind_recipe(json, recipe.sections());
  // Before anything starts: a GPU asked for on a machine without one is refused here, naming the key.
  const at::Device device = runtime::resolve_device(recipe.run.device, cl.has("device") ? "--device" : "run.device");
  if (cl.check_only()) {  // what the server's constructor checks, short of loading the reward model
    for (auto& v : recipe.reward.verifiers) reward::find_verifier(v);
    cl.report_valid();
    return 0;
  }
  // Block the stop signals in every thread (the ones started below inherit the mask); one thread
  // waits for them with sigwait and stops the server, so no work happens in a signal handler.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  runtime::init_and_announce(cl.threads() > 0 ? cl.threads() : static_cast<int>(recipe.run.threads));
  reward::RewardServer server(recipe.reward, device);
  int port = server.bind();
  std::atomic<bool> exiting{false};
  std::thread watcher([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    if (exiting) return;  // woken by the exit path below
    log::info(std::string("reward-server: ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") + ", stopping");
    server.stop();
  });
  std::cout << "listening on http://" << recipe.reward.host << ":" << port << std::endl;
  server.serve();
  server.stop();
  exiting = true;
  pthread_kill(watcher.native_handle(), SIGTERM);  // no-op when the watcher already returned
  watcher.join();
  std::cout << "reward-server: stopped" << std::endl;
  return 0;
}

}  // namespace ptk::app
