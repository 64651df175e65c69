// `ptk reward-server` as a process: it prints `listening on http://127.0.0.1:PORT` once ready,
// answers /get_reward there, and SIGTERM (or SIGINT) stops it cleanly with exit status 0.
// Not the protocol details (reward_server_test.cpp).
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <regex>
#include <thread>

#include "tests/support/test_util.h"

namespace ptk {
namespace {

struct Child {
  pid_t pid = -1;
  int out_fd = -1;
  std::string out;
};

Child spawn(const std::vector<std::string>& args) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  Child c;
  c.pid = fork();
  if (c.pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  c.out_fd = fds[0];
  return c;
}

// Reads the child's output until `re` matches (or 60 s pass); returns the first group.
std::string wait_for(Child& c, const std::regex& re) {
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::smatch m;
  while (std::chrono::steady_clock::now() < until) {
    if (std::regex_search(c.out, m, re)) return m[1];
    char buf[4096];
    ssize_t n = read(c.out_fd, buf, sizeof buf);
    if (n <= 0) break;
    c.out.append(buf, static_cast<size_t>(n));
  }
  return "";
}

// Exit status after `sig`, or -1 if the process did not end within 20 s (then it is killed).
int stop_with(Child& c, int sig) {
  kill(c.pid, sig);
  for (int i = 0; i < 2000; ++i) {
    int st = 0;
    if (waitpid(c.pid, &st, WNOHANG) == c.pid) {
      char buf[4096];
      for (ssize_t n; (n = read(c.out_fd, buf, sizeof buf)) > 0;) c.out.append(buf, static_cast<size_t>(n));
      close(c.out_fd);
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(c.pid, SIGKILL);
  waitpid(c.pid, nullptr, 0);
  return -1;
}

TEST(RewardServerCli, ListensAnswersAndStopsOnSigtermAndSigint) {
  test::TempDir tmp;
  std::string recipe = tmp.write("server.json", R"({
    // verifier-only server: starts in well under a second
    "reward": {"verifiers": ["math"], "max_wait_ms": 1},
  })");
  for (int sig : {SIGTERM, SIGINT}) {
    Child c = spawn({test::ptk_binary(), "reward-server", "--recipe", recipe, "--port", "0", "--host", "127.0.0.1"});
    std::string port = wait_for(c, std::regex(R"(listening on http://127\.0\.0\.1:(\d+))"));
    ASSERT_FALSE(port.empty()) << c.out;
    httplib::Client cli("127.0.0.1", std::stoi(port));
    auto res = cli.Post("/get_reward", R"({"query": ["Q: 2+2? The answer is 4."], "prompts": ["Q: 2+2? "], "labels": ["4"]})",
                        "application/json");
    ASSERT_TRUE(res) << c.out;
    EXPECT_EQ(res->status, 200) << res->body;
    EXPECT_NE(res->body.find("\"rewards\":[1.0]"), std::string::npos) << res->body;
    EXPECT_EQ(stop_with(c, sig), 0) << c.out;
    EXPECT_NE(c.out.find("reward-server: stopped"), std::string::npos) << c.out;
    EXPECT_NE(c.out.find("POST /get_reward 200"), std::string::npos) << "no request log line:\n" << c.out;
    EXPECT_FALSE(cli.Get("/health")) << "still answering after the signal";
  }
}

TEST(RewardServerCli, BadRecipeFailsWithAMessage) {
  test::TempDir tmp;
  std::string recipe = tmp.write("server.json", R"({"reward": {"verifiers": ["math"], "verifier_weights": [1, 2]}})");
  auto r = test::run(test::ptk_binary() + " reward-server --recipe " + recipe);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("verifier_weights"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace ptk
