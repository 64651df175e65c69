// A small HTTP/1.1 server for the reward server: one event-loop thread (epoll, non-blocking
// sockets) owns every connection and reads and writes for all of them; a pool of worker threads
// runs the handlers on whole requests. A client that sends slowly, stops sending, or never reads
// its answer costs a socket and a few KiB, never a thread, and is dropped at its deadline, so it
// cannot starve the others (cpp-httplib gives each connection a thread for its lifetime and only
// a per-recv() timeout, so 16 slow clients took all 16 threads).
//
// Bounds: at most max_connections sockets (when full, the longest-idle keep-alive connection is
// closed for the newcomer, else the newcomer gets a 503); a request head must arrive within
// header_timeout_ms of its first byte, the whole request within request_timeout_ms, an answer must
// be taken within request_timeout_ms; an idle keep-alive connection is closed after idle_timeout_ms;
// bodies are bounded by Limits::max_body_bytes each and max_buffered_bytes together (a request that
// would pass the total gets a 503; the bytes of a request count until its answer is taken, and the
// queued request of a client that resets is dropped). `check_head` runs on the head alone, so a
// request can be refused (401, 404, 405) before its body is read. An error answer closes the
// connection after a short lingering read, so the client sees the answer rather than a reset. Each
// loop turn parses at most one request per pipelining connection and accepts at most 64
// connections, so no single client holds the loop.
//
// stop() (any thread, idempotent) closes the listening socket and every connection at once, lets
// running handlers finish, and returns when serve() has. No LibTorch here.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "reward/http_request.h"

namespace ptk::http {

struct Response {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers (e.g. Allow)
};

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0 = any free port
  int threads = 16;
  Limits limits;
  int64_t max_connections = 512;
  int64_t max_buffered_bytes = 256 << 20;
  int64_t header_timeout_ms = 10000;
  int64_t request_timeout_ms = 60000;
  int64_t idle_timeout_ms = 30000;
  int64_t linger_ms = 2000;  // reading (and dropping) what a refused client still sends before closing
};

struct ServerStats {
  int64_t connections_open = 0, connections_total = 0, connections_refused = 0, timeouts = 0, bad_requests = 0;
  int64_t buffered_bytes = 0;
};

class Server {
 public:
  // Handler for a whole request (a worker thread). Must not throw: a throw answers 500.
  using Handler = std::function<Response(const Request&)>;
  // Runs on the head alone (the event-loop thread; keep it cheap): a Response answers at once and
  // the body is never read; nullopt reads the body and calls the handler.
  using HeadCheck = std::function<std::optional<Response>(const Request&)>;
  // Told of every answer the server makes itself (4xx/5xx on framing, limits and timeouts) with the
  // request as far as it was read, for logs and metrics; it may reword the answer. Event-loop thread.
  using ErrorHook = std::function<void(const Request&, Response&)>;

  Server(ServerOptions options, HeadCheck check_head, Handler handler, ErrorHook on_error = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port and listens (the accept queue holds connections until serve()); returns the
  // bound port. Throws ptk::Error when the address cannot be bound.
  int bind();
  // Serves until stop(); returns once every worker has finished. Call after bind().
  void serve();
  void stop();
  ServerStats stats() const;

  // A JSON body {"error": "<message>"} with `status`.
  static Response error(int status, const std::string& message);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptk::http
