// http_bench: the reward server's HTTP layer (reward/http_server.h) against the one it replaced,
// cpp-httplib's Server (0.11, the same http_threads pool), side by side in one process with the same
// trivial handler (answers the body's size), so only the HTTP layer differs. Two loads:
//   plain: C keep-alive clients x R POSTs of a B-byte body each;
//   slow:  the same, while S connections each send one header byte every 300 ms (slowloris).
// Each load runs twice: with cpp-httplib's client (it writes head and body in two sends, so a
// server's delayed ACK costs it ~40 ms) and with a raw keep-alive socket sending each request in
// one write (as Python's http.client, OpenRLHF's client, does).
// Reports requests/s, p50/p99 latency and the ratio ours / httplib. Prints figures; never fails on time.
//
//   build/bench/http_bench [--clients 16] [--requests 500] [--body 2048] [--slow 16] [--threads 16]
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "reward/http_server.h"
#include "tests/support/raw_http.h"

namespace {

using Clock = std::chrono::steady_clock;

int arg(int argc, char** argv, const std::string& name, int def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return std::stoi(argv[i + 1]);
  return def;
}

struct Result {
  double rps = 0, p50 = 0, p99 = 0;
  int failed = 0;
};

// C clients x R requests; a client stops at its first failure or after `budget_s` seconds.
// one_write: a raw keep-alive socket, each request in one send; else httplib::Client.
Result load(int port, int clients, int requests, const std::string& body, double budget_s, bool one_write) {
  std::vector<std::vector<double>> lat(static_cast<size_t>(clients));
  std::atomic<int> failed{0};
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c)
    ts.emplace_back([&, c] {
      if (one_write) {
        const std::string req = "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
        int fd = ptk::test::connect_loopback(port);
        for (int r = 0; r < requests; ++r) {
          auto s = Clock::now();
          if (fd < 0 || std::chrono::duration<double>(s - t0).count() > budget_s || !ptk::test::send_all(fd, req)) {
            failed += requests - r;
            break;
          }
          auto a = ptk::test::read_answer(fd, 5000);
          if (a.status != 200) {
            failed += requests - r;
            break;
          }
          if (a.closed || a.head.find("Connection: close") != std::string::npos) {  // httplib: every 5 requests
            ::close(fd);
            fd = ptk::test::connect_loopback(port);
          }
          lat[static_cast<size_t>(c)].push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
        }
        if (fd >= 0) ::close(fd);
        return;
      }
      httplib::Client cli("127.0.0.1", port);
      cli.set_keep_alive(true);
      cli.set_read_timeout(5, 0);
      cli.set_connection_timeout(5, 0);
      for (int r = 0; r < requests; ++r) {
        if (std::chrono::duration<double>(Clock::now() - t0).count() > budget_s) {
          failed += requests - r;
          return;
        }
        auto s = Clock::now();
        auto res = cli.Post("/echo", body, "application/json");
        if (!res || res->status != 200) {
          failed += requests - r;
          return;
        }
        lat[static_cast<size_t>(c)].push_back(std::chrono::duration<double, std::milli>(Clock::now() - s).count());
      }
    });
  for (auto& t : ts) t.join();
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> all;
  for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  Result r;
  r.failed = failed;
  r.rps = static_cast<double>(all.size()) / secs;
  if (!all.empty()) {
    r.p50 = all[all.size() / 2];
    r.p99 = all[std::min(all.size() - 1, all.size() * 99 / 100)];
  }
  return r;
}

void print(const char* load_name, const char* server, const Result& r, int total) {
  std::printf("%-10s %-8s %10.0f req/s   p50 %7.2f ms   p99 %8.2f ms   %d of %d failed or not sent\n", load_name,
              server, r.rps, r.p50, r.p99, r.failed, total);
}

}  // namespace

int main(int argc, char** argv) {
  const int clients = arg(argc, argv, "--clients", 16), requests = arg(argc, argv, "--requests", 500),
            body_bytes = arg(argc, argv, "--body", 2048), slow = arg(argc, argv, "--slow", 16),
            threads = arg(argc, argv, "--threads", 16);
  const std::string body(static_cast<size_t>(body_bytes), 'x');
  std::printf("http_bench: %d clients x %d requests, %d-byte bodies, %d worker threads; slowloris: %d slow connections\n",
              clients, requests, body_bytes, threads, slow);

  // Ours.
  ptk::http::ServerOptions o;
  o.threads = threads;
  ptk::http::Server ours(
      o, [](const ptk::http::Request&) { return std::optional<ptk::http::Response>(); },
      [](const ptk::http::Request& r) {
        return ptk::http::Response{200, std::to_string(r.body.size()), "text/plain", {}};
      });
  int ours_port = ours.bind();
  std::thread ours_thread([&] { ours.serve(); });

  // cpp-httplib's server, as reward_server.cpp used it.
  httplib::Server theirs;
  theirs.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  theirs.Post("/echo", [](const httplib::Request& req, httplib::Response& res) {
    res.set_content(std::to_string(req.body.size()), "text/plain");
  });
  int theirs_port = theirs.bind_to_any_port("127.0.0.1");
  std::thread theirs_thread([&] { theirs.listen_after_bind(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  const int total = clients * requests;
  for (bool one_write : {false, true}) {
    const char* name = one_write ? "one-write" : "httplib-c";
    for (int rep = 0; rep < 2; ++rep) {  // alternate, twice: the machine is shared and noisy
      Result a = load(ours_port, clients, requests, body, 60, one_write);
      Result b = load(theirs_port, clients, requests, body, 60, one_write);
      print(name, "ptk", a, total);
      print(name, "httplib", b, total);
      std::printf("%-10s ptk / httplib: %.2fx requests/s\n", name, b.rps > 0 ? a.rps / b.rps : 0.0);
    }
  }
  for (bool one_write : {false, true}) {
    ptk::test::Attackers at_ours(ours_port, slow, 0, 300);
    ptk::test::Attackers at_theirs(theirs_port, slow, 0, 300);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    Result a = load(ours_port, clients, requests / 10, body, 10, one_write);
    Result b = load(theirs_port, clients, requests / 10, body, 10, one_write);
    const char* name = one_write ? "slow+1w" : "slow+hc";
    print(name, "ptk", a, clients * (requests / 10));
    print(name, "httplib", b, clients * (requests / 10));
  }
  ours.stop();
  ours_thread.join();
  theirs.stop();
  theirs_thread.join();
  return 0;
}
