// `ptk reward-server` as a process: it prints `listening on http://127.0.0.1:PORT` once ready,
// answers /get_reward there, and SIGTERM (or SIGINT) stops it cleanly with exit status 0; under
// attack (a 1M-level nested body, an unauthenticated and an endless chunked upload, 64 slow and 64
// idle connections) it goes on answering within a second, within a memory bound, and still stops
// within seconds. Not the protocol details (reward_server_test.cpp) or the HTTP layer alone
// (http_server_test.cpp).
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <regex>
#include <thread>

#include "tests/support/raw_http.h"
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

// A /proc/<pid>/status field in KiB (VmRSS, VmHWM), or -1.
long proc_kib(pid_t pid, const std::string& field) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
  return -1;
}

TEST(RewardServerCli, HostileClientsNeitherCrashNorStarveNorHoldIt) {
  test::TempDir tmp;
  std::string recipe = tmp.write("server.json", R"({"reward": {"verifiers": ["exact"], "api_key": "k"}})");
  Child c = spawn({test::ptk_binary(), "reward-server", "--recipe", recipe, "--port", "0"});
  std::string port_s = wait_for(c, std::regex(R"(listening on http://127\.0\.0\.1:(\d+))"));
  ASSERT_FALSE(port_s.empty()) << c.out;
  const int port = std::stoi(port_s);
  std::thread drain([&] {  // every answer is logged: keep the pipe from filling and blocking it
    char buf[4096];
    while (read(c.out_fd, buf, sizeof buf) > 0) {
    }
  });
  struct Cleanup {  // on any early return: no server left running, no thread left joinable
    Child& c;
    std::thread& drain;
    ~Cleanup() {
      if (kill(c.pid, 0) == 0) {
        kill(c.pid, SIGKILL);
        waitpid(c.pid, nullptr, 0);
      }
      if (drain.joinable()) drain.join();
      close(c.out_fd);
    }
  } cleanup{c, drain};
  const std::string auth = "Authorization: Bearer k\r\n";
  auto post = [&](const std::string& body) {
    return test::request(port, "POST /get_reward HTTP/1.1\r\n" + auth + "Content-Length: " +
                                   std::to_string(body.size()) + "\r\n\r\n" + body);
  };
  const std::string good = R"({"query": ["abc"], "labels": ["abc"]})";
  ASSERT_EQ(post(good).status, 200);
  long rss0 = proc_kib(c.pid, "VmRSS");

  // 1. A body nested a million levels deep: a 400, and the server goes on.
  auto deep = post(std::string(1000000, '['));
  EXPECT_EQ(deep.status, 400) << deep.body;
  EXPECT_EQ(post(good).status, 200) << "the server did not survive the nested body";

  // 2. An unauthenticated chunked upload is refused on its head, before any body is sent.
  int fd = test::connect_loopback(port);
  ASSERT_TRUE(test::send_all(fd, "POST /get_reward HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
  EXPECT_EQ(test::read_answer(fd, 5000).status, 401);
  close(fd);

  // 3. An authenticated endless chunked upload is cut off with a 413 past reward.max_body_bytes.
  fd = test::connect_loopback(port);
  ASSERT_TRUE(test::send_all(fd, "POST /get_reward HTTP/1.1\r\n" + auth + "Transfer-Encoding: chunked\r\n\r\n"));
  std::atomic<bool> stop_send{false};
  std::thread sender([&] {
    std::string chunk = "100000\r\n" + std::string(1 << 20, '[') + "\r\n";
    while (!stop_send && test::send_all(fd, chunk)) {
    }
  });
  auto big = test::read_answer(fd, 30000);
  stop_send = true;
  shutdown(fd, SHUT_RDWR);
  sender.join();
  close(fd);
  EXPECT_EQ(big.status, 413) << big.body;
  EXPECT_NE(big.body.find("max_body_bytes"), std::string::npos) << big.body;

  // 4. 64 slow and 64 idle connections: normal requests are still answered within a second.
  {
    test::Attackers attackers(port, 64, 64, 300);
    ASSERT_EQ(attackers.fds.size(), 128u);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    for (int i = 0; i < 10; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      auto a = post(good);
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(a.status, 200) << a.body;
      EXPECT_LT(ms, 1000) << "request " << i << " waited behind slow clients";
    }
    // Peak memory through all of this: the 16 MiB body limit and its buffer, not the 400 MB sent.
    long hwm = proc_kib(c.pid, "VmHWM");
    std::printf("reward-server RSS before the attacks %ld MiB, peak %ld MiB\n", rss0 / 1024, hwm / 1024);
    EXPECT_LT(hwm - rss0, 96 * 1024) << "peak RSS grew by " << (hwm - rss0) / 1024 << " MiB";

    // 5. SIGTERM with all of them still connected: exits within seconds.
    auto t0 = std::chrono::steady_clock::now();
    kill(c.pid, SIGTERM);
    int st = 0;
    bool exited = false;
    for (int i = 0; i < 500 && !exited; ++i) {
      exited = waitpid(c.pid, &st, WNOHANG) == c.pid;
      if (!exited) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    if (!exited) {
      kill(c.pid, SIGKILL);
      waitpid(c.pid, &st, 0);
    }
    EXPECT_TRUE(exited) << "still running 5 s after SIGTERM";
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "status " << st;
    std::printf("SIGTERM to exit with 128 slow/idle connections: %lld ms\n", static_cast<long long>(ms));
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
