// An incremental, bounded HTTP/1.1 request parser for the reward server (http_server.h): request
// line, headers, a Content-Length or chunked body. Bytes go in as they arrive, in any split; the
// parser stops after the head so the server can refuse a request (auth, route, size) before its
// body is read, and again after a whole request (the bytes after it belong to the next one).
// Memory is bounded by Limits: the head by max_head_bytes, the body by max_body_bytes, a chunk-size
// line by 1 KiB. Ambiguous framing is refused, never guessed (two Content-Length headers, both
// Content-Length and Transfer-Encoding, obsolete header folding, a bare CR): the request-smuggling
// cases. No sockets and no LibTorch here; fuzz/fuzz_http_request.cpp drives it with random input.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ptk::http {

struct Request {
  std::string method, target, path, query;  // path = target up to '?', query = after it
  int minor_version = 1;                    // HTTP/1.<minor>
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, values trimmed
  std::string body;
  int64_t content_length = -1;  // -1: none given
  bool chunked = false;
  bool keep_alive = true;        // after this request (Connection header and version)
  bool expect_continue = false;  // `Expect: 100-continue`
  std::string remote_addr;       // the peer's address, set by the server

  // The first header named `lower_name` (lower case), or nullptr.
  const std::string* header(std::string_view lower_name) const;
};

struct Limits {
  size_t max_head_bytes = 64 << 10;  // request line + headers (and a chunked body's trailers)
  size_t max_headers = 100;
  size_t max_body_bytes = 16 << 20;
};

class RequestParser {
 public:
  enum class State {
    kHead,      // reading the request line and headers
    kHeadDone,  // the head is complete: call accept_body() (or answer without reading the body)
    kBody,      // reading the body
    kDone,      // a whole request: request() is ready; reset() before the next one
    kError,     // error_status() / error_message(); the connection must be closed after answering
  };

  explicit RequestParser(Limits limits = {});

  // Consumes bytes of `data` and returns how many it used: fewer than `n` when it stops at kHeadDone,
  // kDone or kError (the rest is for later, or the next request).
  size_t feed(const char* data, size_t n);
  // From kHeadDone: go on to read the body (or straight to kDone when there is none).
  void accept_body();
  // Forget the request; ready for the next one on the same connection.
  void reset();

  State state() const { return state_; }
  // True once any byte of the current request arrived (leading blank lines included).
  bool started() const { return started_; }
  int error_status() const { return error_status_; }
  const std::string& error_message() const { return error_message_; }
  Request& request() { return req_; }
  const Request& request() const { return req_; }

 private:
  enum class Body { kFixed, kChunkSize, kChunkData, kChunkDataEnd, kTrailer };
  size_t feed_head(const char* data, size_t n);
  size_t feed_body(const char* data, size_t n);
  void parse_head();
  bool parse_chunk_size_line();
  void fail(int status, std::string message);

  Limits limits_;
  State state_ = State::kHead;
  bool started_ = false;
  std::string head_;     // the head's bytes so far (bounded by max_head_bytes)
  size_t line_start_ = 0;
  std::string line_;     // a chunk-size or trailer line (bounded)
  size_t trailer_bytes_ = 0;
  Body body_state_ = Body::kFixed;
  uint64_t remaining_ = 0;  // of the fixed body or the current chunk
  int error_status_ = 0;
  std::string error_message_;
  Request req_;
};

// The standard reason phrase of a status code ("OK", "Payload Too Large", ...).
const char* reason_phrase(int status);

}  // namespace ptk::http
