// libFuzzer harness: the reward server's HTTP request parser (reward/http_request.h) on arbitrary
// bytes, fed in the splits the first input byte picks, as a connection would deliver them: body
// accepted after each head, parser reset after each request. Checks the parser's own promises:
// it never consumes more than it is given, never makes progress-free loops, keeps the head and the
// body within their limits, and every refusal carries a 4xx/5xx status and a message.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "reward/http_request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t step = 1 + data[0] % 17;
  const char* p = reinterpret_cast<const char*>(data + 1);
  size_t n = size - 1;
  ptk::http::Limits limits;
  limits.max_head_bytes = 512;
  limits.max_headers = 8;
  limits.max_body_bytes = 256;
  ptk::http::RequestParser parser(limits);
  using State = ptk::http::RequestParser::State;
  size_t off = 0;
  while (off < n) {
    size_t give = step < n - off ? step : n - off;
    size_t used = parser.feed(p + off, give);
    if (used > give) std::abort();
    off += used;
    switch (parser.state()) {
      case State::kHeadDone:
        parser.accept_body();
        if (parser.state() == State::kDone) parser.reset();
        break;
      case State::kDone:
        if (parser.request().body.size() > limits.max_body_bytes) std::abort();
        if (parser.request().method.empty() || parser.request().path.empty()) std::abort();
        parser.reset();
        break;
      case State::kError:
        if (parser.error_status() < 400 || parser.error_status() > 599 || parser.error_message().empty()) std::abort();
        return 0;  // a connection closes after an error
      default:
        if (used != give) std::abort();  // reading, yet it left bytes unread
        break;
    }
    if (parser.request().body.size() > limits.max_body_bytes) std::abort();
  }
  return 0;
}
