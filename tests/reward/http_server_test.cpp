// The reward server's HTTP layer (reward/http_server.h) against hostile clients over loopback, with
// a trivial handler: slow and idle connections do not starve the others and are cut at their
// deadlines, the connection limit, refusals on the head before any body is read, a chunked body cut
// off at the limit while it is still being sent, the total body budget, pipelining, 100-continue,
// and stop() returning promptly with slow clients attached. Not the reward protocol
// (reward_server_test.cpp).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "reward/http_server.h"
#include "tests/support/raw_http.h"

namespace ptk::http {
namespace {

using Clock = std::chrono::steady_clock;
using test::connect_loopback;
using test::read_answer;
using test::send_all;
using test::Attackers;

int64_t ms_since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

// A server on a free loopback port, serving on its own thread. POST /echo answers the body's size;
// requests to /secret without `Authorization: yes` are refused on the head (401).
struct TestServer {
  std::unique_ptr<Server> server;
  std::thread thread;
  int port = 0;
  std::atomic<int> handled{0}, hook_calls{0};
  explicit TestServer(ServerOptions o) {
    server = std::make_unique<Server>(
        o,
        [](const Request& r) -> std::optional<Response> {
          if (r.path == "/secret" && !(r.header("authorization") && *r.header("authorization") == "yes"))
            return Server::error(401, "no key");
          if (r.path == "/health") return Response{200, "{}", "application/json", {}};
          return std::nullopt;
        },
        [this](const Request& r) {
          if (r.path == "/slow") std::this_thread::sleep_for(std::chrono::milliseconds(300));
          ++handled;
          return Response{200, std::to_string(r.body.size()), "text/plain", {}};
        },
        [this](const Request&, Response&) { ++hook_calls; });
    port = server->bind();
    thread = std::thread([this] { server->serve(); });
  }
  ~TestServer() {
    server->stop();
    thread.join();
  }
};

ServerOptions options() {
  ServerOptions o;
  o.threads = 2;
  o.limits.max_body_bytes = 1 << 20;
  o.max_connections = 256;
  return o;
}

const std::string kEcho = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";

TEST(HttpServer, SixtyFourSlowAndSixtyFourIdleConnectionsDoNotStarveOthers) {
  TestServer s(options());
  Attackers a(s.port, 64, 64, 300);
  ASSERT_EQ(a.fds.size(), 128u);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  for (int i = 0; i < 20; ++i) {
    auto t0 = Clock::now();
    auto ans = test::request(s.port, kEcho, 5000);
    EXPECT_EQ(ans.status, 200) << "request " << i;
    EXPECT_EQ(ans.body, "5");
    EXPECT_LT(ms_since(t0), 1000) << "request " << i << " waited behind the slow clients";
  }
  // stop() closes everything at once, slow clients included.
  auto t0 = Clock::now();
  s.server->stop();
  EXPECT_LT(ms_since(t0), 3000);
}

TEST(HttpServer, SlowHeadsAndSlowBodiesAreCutAtTheirDeadlines) {
  ServerOptions o = options();
  o.header_timeout_ms = 400;
  o.request_timeout_ms = 1200;
  o.idle_timeout_ms = 600;
  TestServer s(o);
  Attackers head(s.port, 1, 0, 100);  // a header byte every 100 ms: never finishes its head
  int body = connect_loopback(s.port);
  ASSERT_TRUE(send_all(body, "POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc"));
  int idle = connect_loopback(s.port);
  ASSERT_GE(idle, 0);
  auto h = read_answer(head.fds[0], 5000, true);
  EXPECT_EQ(h.status, 408);
  EXPECT_NE(h.body.find("request head did not arrive"), std::string::npos) << h.body;
  EXPECT_TRUE(h.closed);
  auto b = read_answer(body, 5000, true);
  EXPECT_EQ(b.status, 408);
  EXPECT_NE(b.body.find("did not arrive"), std::string::npos) << b.body;
  EXPECT_TRUE(b.closed);
  auto i = read_answer(idle, 5000);
  EXPECT_EQ(i.status, 0);
  EXPECT_TRUE(i.closed) << "the idle connection was not closed";
  EXPECT_GE(s.server->stats().timeouts, 2);
  ::close(body);
  ::close(idle);
}

TEST(HttpServer, AFullServerClosesItsLongestIdleConnectionElseAnswers503) {
  ServerOptions o = options();
  o.max_connections = 8;
  TestServer s(o);
  {
    Attackers idle(s.port, 0, 8, 1000);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    auto ans = test::request(s.port, kEcho);
    EXPECT_EQ(ans.status, 200) << "a newcomer should replace the longest-idle connection";
    auto first = read_answer(idle.fds[0], 2000);
    EXPECT_TRUE(first.closed) << "the longest-idle connection is still open";
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Attackers slow(s.port, 8, 0, 100);  // busy, not idle: nothing to evict
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto ans = test::request(s.port, kEcho);
  EXPECT_EQ(ans.status, 503) << ans.body;
  EXPECT_GE(s.server->stats().connections_refused, 1);
}

TEST(HttpServer, ARequestRefusedOnItsHeadIsAnsweredBeforeItsBodyIsSent) {
  TestServer s(options());
  int fd = connect_loopback(s.port);
  // 400 MB announced, none sent: the 401 must come anyway, and the connection close after it.
  ASSERT_TRUE(send_all(fd, "POST /secret HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
  auto a = read_answer(fd, 3000, true);
  EXPECT_EQ(a.status, 401);
  EXPECT_TRUE(a.closed);
  ::close(fd);
  fd = connect_loopback(s.port);
  ASSERT_TRUE(send_all(fd, "POST /secret HTTP/1.1\r\nContent-Length: 400000000\r\n\r\n"));
  a = read_answer(fd, 3000, true);
  EXPECT_EQ(a.status, 413) << "over max_body_bytes is refused on the head too";
  ::close(fd);
  EXPECT_EQ(s.handled, 0);
  // With the key the same path reaches the handler.
  auto ok = test::request(s.port, "POST /secret HTTP/1.1\r\nAuthorization: yes\r\nContent-Length: 2\r\n\r\nab");
  EXPECT_EQ(ok.status, 200);
  EXPECT_EQ(ok.body, "2");
}

TEST(HttpServer, AChunkedBodyIsCutOffWithA413WhileItIsStillBeingSent) {
  TestServer s(options());  // 1 MiB limit
  int fd = connect_loopback(s.port);
  ASSERT_TRUE(send_all(fd, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
  std::atomic<bool> stop{false};
  std::atomic<int64_t> sent{0};
  std::thread sender([&] {  // endless 64 KiB chunks, never the last one
    std::string chunk = "10000\r\n" + std::string(65536, 'x') + "\r\n";
    while (!stop && send_all(fd, chunk)) sent += 65536;
  });
  auto a = read_answer(fd, 10000);
  stop = true;
  ::shutdown(fd, SHUT_RDWR);
  sender.join();
  ::close(fd);
  EXPECT_EQ(a.status, 413) << a.body;
  EXPECT_NE(a.body.find("chunked"), std::string::npos) << a.body;
  EXPECT_EQ(s.handled, 0);
  EXPECT_EQ(s.server->stats().buffered_bytes, 0);
}

TEST(HttpServer, BodiesTogetherStayWithinTheBufferBudget) {
  ServerOptions o = options();
  o.max_buffered_bytes = 2 << 20;  // two 1 MiB bodies
  TestServer s(o);
  std::vector<int> fds;
  std::string part(900 << 10, 'x');  // 900 KiB of a 1 MiB body, then stall
  for (int i = 0; i < 2; ++i) {
    int fd = connect_loopback(s.port);
    ASSERT_TRUE(send_all(fd, "POST /echo HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + part));
    fds.push_back(fd);
  }
  for (int i = 0; i < 100 && s.server->stats().buffered_bytes < 2 * static_cast<int64_t>(part.size()); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(s.server->stats().buffered_bytes, 2 * static_cast<int64_t>(part.size()));
  int third = connect_loopback(s.port);
  ASSERT_TRUE(send_all(third, "POST /echo HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + part));
  auto a = read_answer(third, 5000);
  EXPECT_EQ(a.status, 503) << a.body;
  ::close(third);
  // A small request still fits, and the stalled ones finish normally.
  EXPECT_EQ(test::request(s.port, kEcho).status, 200);
  for (int fd : fds) {
    ASSERT_TRUE(send_all(fd, std::string((1 << 20) - part.size(), 'y')));
    auto r = read_answer(fd, 5000);
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.body, "1048576");
    ::close(fd);
  }
}

TEST(HttpServer, PipelinedRequestsAnswerInOrderAndContinueIsSent) {
  TestServer s(options());
  int fd = connect_loopback(s.port);
  ASSERT_TRUE(send_all(fd, kEcho + "GET /health HTTP/1.1\r\n\r\n" +
                               "POST /echo HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab"));
  std::string all;  // the three answers, in order, then the close
  timeval tv{3, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) all.append(buf, static_cast<size_t>(n));
  ::close(fd);
  size_t p1 = all.find("\r\n\r\n5"), p2 = all.find("\r\n\r\n{}"), p3 = all.find("\r\n\r\n2");
  EXPECT_TRUE(p1 != std::string::npos && p2 != std::string::npos && p3 != std::string::npos && p1 < p2 && p2 < p3)
      << all;
  EXPECT_EQ(all.substr(all.size() - 5), "\r\n\r\n2") << "not closed after the third answer: " << all;
  // Expect: 100-continue gets its interim answer before the body is sent.
  fd = connect_loopback(s.port);
  ASSERT_TRUE(send_all(fd, "POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"));
  char cont[64] = {};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ssize_t n = ::recv(fd, cont, sizeof cont - 1, 0);
  EXPECT_EQ(std::string(cont, n > 0 ? static_cast<size_t>(n) : 0), "HTTP/1.1 100 Continue\r\n\r\n");
  ASSERT_TRUE(send_all(fd, "abc"));
  EXPECT_EQ(read_answer(fd, 3000).body, "3");
  ::close(fd);
}

TEST(HttpServer, RequestsOfClientsThatResetAreDroppedNotQueued) {
  ServerOptions o = options();
  o.threads = 1;  // busy for 300 ms per request
  TestServer s(o);
  const std::string body(1 << 20, 'x');
  for (int i = 0; i < 20; ++i) {
    int fd = connect_loopback(s.port);
    ASSERT_TRUE(send_all(fd, "POST /slow HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + body));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the server has it whole
    linger reset{1, 0};  // close with RST, as a client that gave up
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
    ::close(fd);
  }
  for (int i = 0; i < 200 && s.server->stats().buffered_bytes > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(s.server->stats().buffered_bytes, 0);
  EXPECT_LE(s.handled, 3) << "requests of clients that left were still scored";
}

TEST(HttpServer, PipelinedFloodsDoNotHoldOthersUpAndAHalfCloseStillGetsItsAnswers) {
  TestServer s(options());
  std::string flood;
  while (flood.size() < (1 << 20)) flood += "GET /health HTTP/1.1\r\n\r\n";
  std::vector<int> floods;
  std::vector<std::thread> senders;
  for (int i = 0; i < 2; ++i) {
    int fd = connect_loopback(s.port);
    floods.push_back(fd);
    senders.emplace_back([fd, &flood] { send_all(fd, flood); });  // and never reads its answers
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  for (int i = 0; i < 5; ++i) {
    auto t0 = Clock::now();
    EXPECT_EQ(test::request(s.port, kEcho).status, 200);
    EXPECT_LT(ms_since(t0), 1000) << "request " << i << " waited behind pipelined floods";
  }
  for (int fd : floods) ::shutdown(fd, SHUT_RDWR);
  for (auto& t : senders) t.join();
  for (int fd : floods) ::close(fd);
  // Two requests, then the client's half-close: both answered before the server closes.
  int fd = connect_loopback(s.port);
  ASSERT_TRUE(send_all(fd, "GET /health HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n"));
  ::shutdown(fd, SHUT_WR);
  std::string all;
  timeval tv{3, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) all.append(buf, static_cast<size_t>(n));
  ::close(fd);
  size_t first = all.find("HTTP/1.1 200"), second = all.find("HTTP/1.1 200", first + 1);
  EXPECT_NE(second, std::string::npos) << all;
}

TEST(HttpServer, BadFramingIsA400AndTheServerGoesOn) {
  TestServer s(options());
  auto a = test::request(s.port, "POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx");
  EXPECT_EQ(a.status, 400);
  EXPECT_NE(a.body.find("more than one Content-Length"), std::string::npos) << a.body;
  EXPECT_EQ(s.hook_calls, 1);
  EXPECT_EQ(test::request(s.port, kEcho).status, 200);
}

}  // namespace
}  // namespace ptk::http
