// The reward server's HTTP request parser (reward/http_request.h) on its own: whole requests in any
// split, the stop after the head, Content-Length and chunked bodies, and each refusal (ambiguous
// framing, limits, malformed lines) with its status. Not sockets (http_server_test.cpp).
#include <gtest/gtest.h>

#include <string>

#include "reward/http_request.h"

namespace ptk::http {
namespace {

// Feeds `text` `step` bytes at a time, accepting the body after the head; returns the parser.
RequestParser parse(const std::string& text, size_t step = 1 << 20, Limits limits = {}) {
  RequestParser p(limits);
  size_t off = 0;
  while (off < text.size()) {
    size_t n = std::min(step, text.size() - off);
    size_t used = p.feed(text.data() + off, n);
    off += used;
    if (p.state() == RequestParser::State::kHeadDone) p.accept_body();
    if (p.state() == RequestParser::State::kDone || p.state() == RequestParser::State::kError) break;
    if (used == 0 && p.state() != RequestParser::State::kBody) break;
  }
  if (p.state() == RequestParser::State::kHeadDone) p.accept_body();
  return p;
}

TEST(HttpRequest, ContentLengthBodyInAnySplit) {
  const std::string text =
      "\r\nPOST /get_reward?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
      "{\"query\":1}";
  for (size_t step : {1, 2, 3, 7, 64, 4096}) {
    auto p = parse(text, step);
    ASSERT_EQ(p.state(), RequestParser::State::kDone) << step << ": " << p.error_message();
    const Request& r = p.request();
    EXPECT_EQ(r.method, "POST");
    EXPECT_EQ(r.path, "/get_reward");
    EXPECT_EQ(r.query, "x=1");
    EXPECT_EQ(r.body, "{\"query\":1}");
    ASSERT_NE(r.header("content-type"), nullptr);
    EXPECT_EQ(*r.header("content-type"), "application/json");
    EXPECT_TRUE(r.keep_alive);
  }
}

TEST(HttpRequest, StopsAfterTheHeadUntilTheBodyIsAccepted) {
  const std::string text = "POST /get_reward HTTP/1.1\r\nAuthorization: Bearer x\r\nContent-Length: 5\r\n\r\nhello";
  RequestParser p;
  size_t used = p.feed(text.data(), text.size());
  EXPECT_EQ(p.state(), RequestParser::State::kHeadDone);
  EXPECT_EQ(used, text.size() - 5);  // not one byte of the body
  EXPECT_TRUE(p.request().body.empty());
  p.accept_body();
  used += p.feed(text.data() + used, text.size() - used);
  EXPECT_EQ(p.state(), RequestParser::State::kDone);
  EXPECT_EQ(p.request().body, "hello");
}

TEST(HttpRequest, ChunkedBodyWithExtensionsAndTrailers) {
  const std::string text =
      "POST /get_reward HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
      "5 ;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: y\r\n\r\nGET / HTTP/1.1\r\n\r\n";
  for (size_t step : {1, 5, 4096}) {
    auto p = parse(text, step);
    ASSERT_EQ(p.state(), RequestParser::State::kDone) << p.error_message();
    EXPECT_EQ(p.request().body, "hello 0123456789");
    EXPECT_TRUE(p.request().chunked);
  }
}

TEST(HttpRequest, StopsAtTheEndOfARequestForTheNextOne) {
  const std::string one = "GET /health HTTP/1.1\r\n\r\n";
  const std::string text = one + "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n";
  RequestParser p;
  size_t used = p.feed(text.data(), text.size());
  ASSERT_EQ(p.state(), RequestParser::State::kHeadDone);
  p.accept_body();
  EXPECT_EQ(p.state(), RequestParser::State::kDone);
  EXPECT_EQ(used, one.size());
  p.reset();
  p.feed(text.data() + used, text.size() - used);
  p.accept_body();
  EXPECT_EQ(p.state(), RequestParser::State::kDone);
  EXPECT_EQ(p.request().path, "/metrics");
  EXPECT_FALSE(p.request().keep_alive);
}

TEST(HttpRequest, KeepAliveByVersionAndHeader) {
  EXPECT_FALSE(parse("GET / HTTP/1.0\r\n\r\n").request().keep_alive);
  EXPECT_TRUE(parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").request().keep_alive);
  EXPECT_FALSE(parse("GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n").request().keep_alive);
  EXPECT_TRUE(parse("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx").request().expect_continue);
}

TEST(HttpRequest, RefusesAmbiguousMalformedAndOversizedRequests) {
  struct Case {
    std::string text;
    int status;
    std::string says;
  };
  Limits small;
  small.max_body_bytes = 10;
  small.max_head_bytes = 200;
  small.max_headers = 3;
  const std::string cl2 = "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc";
  std::vector<Case> cases = {
      {cl2, 400, "more than one Content-Length"},
      {"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "ambiguous"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "not supported"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "more than one"},
      {"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"},
      {"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "decimal"},
      {"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", 400, "decimal"},
      {"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 413, "over 10 bytes"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n5\r\nabcde\r\n", 413, "chunked"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n", 400, "15 hex digits"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", 400, "CRLF"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", 400, "CRLF"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n", 400, "CRLF"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n", 400, "control character"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n", 400, "malformed chunk size"},
      {std::string("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: a") + '\0' + "\r\n\r\n", 400,
       "control character"},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: a\n\r\n", 400, "trailer line"},
      {"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400, "folding"},
      {"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400, "bare CR"},
      {"GET / HTTP/1.1\r\nX a: b\r\n\r\n", 400, "header name"},
      {"GET / HTTP/1.1\r\nnocolon\r\n\r\n", 400, "no `name:`"},
      {std::string("GET / HTTP/1.1\r\nX: a") + '\0' + "b\r\n\r\n", 400, "control character"},
      {"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 431, "header fields"},
      {"GET / HTTP/1.1\r\nX: " + std::string(300, 'a') + "\r\n\r\n", 431, "over 200 bytes"},
      {"GET / HTTP/2.0\r\n\r\n", 505, "not supported"},
      {"GET / FTP/1.1\r\n\r\n", 400, "version"},
      {"GET  / HTTP/1.1\r\n\r\n", 400, "request line"},
      {"GET /a b HTTP/1.1\r\n\r\n", 400, "request line"},
      {"G(T / HTTP/1.1\r\n\r\n", 400, "method"},
      {"GET /\x7f HTTP/1.1\r\n\r\n", 400, "target"},
      {"GET ?x HTTP/1.1\r\n\r\n", 400, "must start with /"},
      {"POST / HTTP/1.1\r\nExpect: something\r\n\r\n", 417, "Expect"},
  };
  for (const auto& c : cases) {
    for (size_t step : {1, 4096}) {
      auto p = parse(c.text, step, small);
      ASSERT_EQ(p.state(), RequestParser::State::kError) << c.text;
      EXPECT_EQ(p.error_status(), c.status) << c.text << " -> " << p.error_message();
      EXPECT_NE(p.error_message().find(c.says), std::string::npos) << c.text << " -> " << p.error_message();
    }
  }
}

TEST(HttpRequest, TheChunkedLimitHoldsBeforeTheChunkArrives) {
  Limits l;
  l.max_body_bytes = 1000;
  RequestParser p(l);
  const std::string head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
  p.feed(head.data(), head.size());
  p.accept_body();
  const std::string size_line = "3e9\r\n";  // 1001 bytes announced: refused before any data
  p.feed(size_line.data(), size_line.size());
  EXPECT_EQ(p.state(), RequestParser::State::kError);
  EXPECT_EQ(p.error_status(), 413);
  EXPECT_TRUE(p.request().body.empty());
}

TEST(HttpRequest, MemoryStaysBoundedUnderEndlessInput) {
  Limits l;
  l.max_head_bytes = 4096;
  RequestParser p(l);
  std::string junk(1 << 16, 'a');  // a header line that never ends
  const std::string start = "GET / HTTP/1.1\r\nX: ";
  p.feed(start.data(), start.size());
  size_t used = p.feed(junk.data(), junk.size());
  EXPECT_LT(used, l.max_head_bytes);
  EXPECT_EQ(p.error_status(), 431);
  // Endless blank lines before a request line are dropped as they come.
  RequestParser q(l);
  std::string blanks(1 << 16, '\n');
  EXPECT_EQ(q.feed(blanks.data(), blanks.size()), blanks.size());
  EXPECT_EQ(q.state(), RequestParser::State::kHead);
}

}  // namespace
}  // namespace ptk::http
