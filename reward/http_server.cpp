// The reward server's HTTP layer (see http_server.h): one epoll loop owns every socket; workers
// run handlers on whole requests and hand the answers back through a queue and an eventfd.
#include "reward/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "core/util/error.h"

namespace ptk::http {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kListenTag = 0, kWakeTag = 1, kFirstConnId = 2;
constexpr size_t kReadChunk = 64 << 10;

int64_t ms_since(Clock::time_point t, Clock::time_point now) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(now - t).count();
}

std::string serialize(const Response& r, bool close) {
  std::string out = "HTTP/1.1 " + std::to_string(r.status) + " " + reason_phrase(r.status) + "\r\n";
  out += "Content-Type: " + r.content_type + "\r\n";
  out += "Content-Length: " + std::to_string(r.body.size()) + "\r\n";
  out += close ? "Connection: close\r\n" : "Connection: keep-alive\r\n";
  for (const auto& h : r.headers) out += h.first + ": " + h.second + "\r\n";
  out += "\r\n";
  out += r.body;
  return out;
}

}  // namespace

Response Server::error(int status, const std::string& message) {
  rapidjson::StringBuffer sb;
  rapidjson::Writer<rapidjson::StringBuffer> w(sb);
  w.StartObject();
  w.Key("error");
  w.String(message.c_str(), static_cast<rapidjson::SizeType>(message.size()));
  w.EndObject();
  Response r;
  r.status = status;
  r.body.assign(sb.GetString(), sb.GetSize());
  return r;
}

struct Server::Impl {
  enum class Phase { kRead, kProcess, kWrite, kLinger };
  struct Conn {
    uint64_t id = 0;
    int fd = -1;
    std::string peer;
    Phase phase = Phase::kRead;
    RequestParser parser;
    std::string in;  // received, not yet parsed (at most one read past a whole request)
    size_t in_off = 0;
    std::string out;
    size_t out_off = 0;
    bool close_after_write = false;
    bool keep_alive = true;
    bool writing_interim = false;  // out holds a 100 Continue still being sent while reading
    int64_t buffered = 0;  // body bytes of this connection counted in Impl::buffered
    uint32_t events = 0;
    Clock::time_point idle_since, request_start, write_start, linger_until;
    explicit Conn(Limits l) : parser(l) {}
  };
  struct Task {
    uint64_t conn;
    Request req;
  };
  struct Done {
    uint64_t conn;
    Response res;
  };

  ServerOptions opt;
  HeadCheck check_head;
  Handler handler;
  ErrorHook on_error;

  int listen_fd = -1, epoll_fd = -1, wake_fd = -1;
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns;
  uint64_t next_id = kFirstConnId;
  std::atomic<int64_t> buffered{0};  // body bytes held: parsers' and dispatched requests' (stats() reads it)
  std::vector<uint64_t> pending;  // connections with a pipelined request to parse (event loop)
  std::unordered_map<uint64_t, int64_t> inflight;  // body bytes of dispatched requests, by connection
  std::optional<Clock::time_point> accept_paused_until;

  // Workers.
  std::mutex task_mu;
  std::condition_variable task_cv;
  std::deque<Task> tasks;
  bool workers_stop = false;
  std::mutex done_mu;
  std::deque<Done> done;

  // Lifecycle.
  std::atomic<bool> stopping{false};
  std::mutex life_mu;
  std::condition_variable life_cv;
  bool serving = false;

  std::atomic<int64_t> st_open{0}, st_total{0}, st_refused{0}, st_timeouts{0}, st_bad{0};

  ~Impl() {
    for (auto& [id, c] : conns) ::close(c->fd);
    if (listen_fd >= 0) ::close(listen_fd);
    if (epoll_fd >= 0) ::close(epoll_fd);
    if (wake_fd >= 0) ::close(wake_fd);
  }

  void wake() {
    uint64_t one = 1;
    ssize_t r = ::write(wake_fd, &one, sizeof one);
    (void)r;  // the counter saturating still wakes the loop
  }

  void set_events(Conn& c, uint32_t ev) {
    if (c.events == ev) return;
    epoll_event e{};
    e.events = ev;
    e.data.u64 = c.id;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c.fd, &e);
    c.events = ev;
  }

  void account(Conn& c, int64_t now_bytes) {
    buffered += now_bytes - c.buffered;
    c.buffered = now_bytes;
  }

  void close_conn(uint64_t id) {
    auto it = conns.find(id);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    account(c, 0);
    if (c.phase == Phase::kProcess) {  // the client left: drop its request if no worker took it yet
      bool dropped = false;
      {
        std::lock_guard<std::mutex> g(task_mu);
        for (auto t = tasks.begin(); t != tasks.end(); ++t)
          if (t->conn == id) {
            tasks.erase(t);
            dropped = true;
            break;
          }
      }
      if (dropped) release_inflight(id);  // else the running task's bytes count until it is done
    }
    ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c.fd, nullptr);
    ::close(c.fd);
    conns.erase(it);
    st_open = static_cast<int64_t>(conns.size());
  }

  void release_inflight(uint64_t id) {
    auto it = inflight.find(id);
    if (it == inflight.end()) return;
    buffered -= it->second;
    inflight.erase(it);
  }

  // The connection waits for its next request from now on.
  void to_idle(Conn& c, Clock::time_point now) {
    c.parser.reset();
    c.phase = Phase::kRead;
    c.idle_since = now;
    set_events(c, EPOLLIN | EPOLLRDHUP);
  }

  // Answers on `c`; `close` ends the connection after the answer (and a lingering read).
  void respond(Conn& c, const Response& r, bool close, Clock::time_point now) {
    account(c, 0);
    c.out = c.out.substr(c.out_off) + serialize(r, close);  // after any unsent 100 Continue
    c.out_off = 0;
    c.writing_interim = false;
    c.close_after_write = close;
    c.phase = Phase::kWrite;
    c.write_start = now;
    set_events(c, EPOLLOUT);
    on_writable(c, now);
  }

  // An answer the server makes itself (framing, limits, timeouts): always closes the connection.
  void refuse(Conn& c, int status, const std::string& message, Clock::time_point now) {
    Response r = Server::error(status, message);
    if (status == 408) ++st_timeouts;
    else if (status != 503) ++st_bad;
    c.parser.request().remote_addr = c.peer;
    if (on_error) on_error(c.parser.request(), r);  // may reword r
    respond(c, r, true, now);
  }

  // Sends what `out` holds; after a whole answer: linger-close, or wait for the next request.
  void on_writable(Conn& c, Clock::time_point now) {
    const uint64_t id = c.id;
    while (c.out_off < c.out.size()) {
      ssize_t n = ::send(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
      if (n > 0) {
        c.out_off += static_cast<size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;  // EPOLLOUT will call again
      } else {
        return close_conn(id);
      }
    }
    std::string().swap(c.out);
    c.out_off = 0;
    if (c.writing_interim) {  // the 100 Continue is out: back to reading the body (if still reading)
      c.writing_interim = false;
      set_events(c, c.phase == Phase::kRead ? EPOLLIN | EPOLLRDHUP : 0);
      return;
    }
    if (c.close_after_write) {
      // Read and drop what the client still sends for a moment, so it reads our answer rather
      // than a reset (closing with unread input makes the kernel send RST).
      ::shutdown(c.fd, SHUT_WR);
      c.phase = Phase::kLinger;
      c.linger_until = now + std::chrono::milliseconds(opt.linger_ms);
      c.in.clear();
      c.in_off = 0;
      set_events(c, EPOLLIN | EPOLLRDHUP);
      return;
    }
    to_idle(c, now);
    if (c.in_off < c.in.size()) pending.push_back(c.id);  // a pipelined request already arrived
  }

  void dispatch(Conn& c) {
    c.phase = Phase::kProcess;
    c.keep_alive = c.parser.request().keep_alive;
    set_events(c, 0);
    inflight[c.id] = c.buffered;  // the body's bytes stay counted until its answer is taken
    c.buffered = 0;
    Request req = std::move(c.parser.request());
    req.remote_addr = c.peer;
    {
      std::lock_guard<std::mutex> g(task_mu);
      tasks.push_back({c.id, std::move(req)});
    }
    task_cv.notify_one();
  }

  // Parses what connection `id` has received; stops when it needs an answer. Any answer may close
  // the connection, so it is looked up again after each step.
  void process_input(uint64_t id, Clock::time_point now) {
    for (;;) {
      auto it = conns.find(id);
      if (it == conns.end()) return;
      Conn& c = *it->second;
      if (c.phase != Phase::kRead || c.in_off >= c.in.size()) {
        if (c.in_off == c.in.size()) {
          c.in.clear();
          c.in_off = 0;
        }
        return;
      }
      RequestParser& p = c.parser;
      bool was_started = p.started();
      c.in_off += p.feed(c.in.data() + c.in_off, c.in.size() - c.in_off);
      if (!was_started && p.started()) c.request_start = now;
      account(c, static_cast<int64_t>(p.request().body.size()));
      if (buffered > opt.max_buffered_bytes)
        return refuse(c, 503, "the server holds " + std::to_string(buffered.load()) + " bytes of request bodies (over " +
                                  std::to_string(opt.max_buffered_bytes) + "); retry shortly", now);
      switch (p.state()) {
        case RequestParser::State::kHeadDone: {
          p.request().remote_addr = c.peer;
          std::optional<Response> early = check_head ? check_head(p.request()) : std::nullopt;
          if (early) {
            const Request& r = p.request();
            bool has_body = r.chunked || r.content_length > 0;
            // An unread body ends the connection, and so does a refusal (one request per connect
            // for whoever sends wrong keys or paths).
            return respond(c, *early, has_body || !r.keep_alive || early->status >= 400, now);
          }
          p.accept_body();
          if (p.state() == RequestParser::State::kBody && p.request().expect_continue) {
            c.out = "HTTP/1.1 100 Continue\r\n\r\n";
            c.out_off = 0;
            c.writing_interim = true;
            on_writable(c, now);  // whatever the socket does not take now goes with EPOLLOUT
            if (conns.find(id) == conns.end()) return;
            if (c.writing_interim) set_events(c, EPOLLIN | EPOLLRDHUP | EPOLLOUT);
          }
          if (p.state() == RequestParser::State::kDone) dispatch(c);
          break;
        }
        case RequestParser::State::kDone:
          dispatch(c);
          break;
        case RequestParser::State::kError:
          return refuse(c, p.error_status(), p.error_message(), now);
        default:
          break;
      }
    }
  }

  void on_readable(uint64_t id, Clock::time_point now) {
    char buf[kReadChunk];
    for (int round = 0; round < 16; ++round) {
      auto it = conns.find(id);
      if (it == conns.end()) return;
      Conn& cc = *it->second;
      if (cc.phase != Phase::kRead && cc.phase != Phase::kLinger) return;
      if (cc.in_off < cc.in.size()) return;  // parse what is here first (it is pending): bounds `in`
      ssize_t n = ::recv(cc.fd, buf, sizeof buf, 0);
      // The client closed its side. Every whole request it sent before was parsed and answered
      // first (nothing is read while `in` holds unparsed bytes, or while a request is answered).
      if (n == 0) return close_conn(id);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        return close_conn(id);
      }
      if (cc.phase == Phase::kLinger) continue;  // dropped
      // ACK at once: a client that writes its head and body separately (cpp-httplib's, with Nagle)
      // waits for this ACK before sending the body, and a delayed ACK cost it 40 ms per request.
      int one = 1;
      ::setsockopt(cc.fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
      cc.in.append(buf, static_cast<size_t>(n));
      process_input(id, now);
    }
  }

  // Accepts up to 64 waiting connections (the rest next turn, so a flood cannot hold the loop).
  void accept_all(Clock::time_point now) {
    for (int accepted = 0; accepted < 64; ++accepted) {
      sockaddr_storage addr{};
      socklen_t len = sizeof addr;
      int fd = ::accept4(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if ((errno == EMFILE || errno == ENFILE) && evict_idle()) continue;  // a descriptor is free again
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // Out of descriptors: the rest wait in the accept queue. Stop watching the listening
          // socket for a moment, or level-triggered epoll would spin on it.
          epoll_event e{};
          e.data.u64 = kListenTag;
          ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, listen_fd, &e);
          accept_paused_until = now + std::chrono::milliseconds(100);
        }
        return;
      }
      if (static_cast<int64_t>(conns.size()) >= opt.max_connections && !evict_idle()) {
        static const std::string kBusy =
            serialize(Server::error(503, "the server has its maximum of connections open; retry shortly"), true);
        ++st_refused;  // before the answer: a client that has its 503 finds it counted (stats, /metrics)
        ssize_t n = ::send(fd, kBusy.data(), kBusy.size(), MSG_NOSIGNAL);
        (void)n;
        ::close(fd);
        continue;
      }
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      auto c = std::make_unique<Conn>(opt.limits);
      c->id = next_id++;
      c->fd = fd;
      char host[INET6_ADDRSTRLEN] = "?";
      if (addr.ss_family == AF_INET)
        ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&addr)->sin_addr, host, sizeof host);
      else if (addr.ss_family == AF_INET6)
        ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr, host, sizeof host);
      c->peer = host;
      c->idle_since = now;
      epoll_event e{};
      e.events = EPOLLIN | EPOLLRDHUP;
      e.data.u64 = c->id;
      if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &e) != 0) {
        ::close(fd);
        continue;
      }
      c->events = e.events;
      conns.emplace(c->id, std::move(c));
      ++st_total;
      st_open = static_cast<int64_t>(conns.size());
    }
  }

  // Closes the connection that has waited longest for a request without sending a byte of one.
  bool evict_idle() {
    Conn* oldest = nullptr;
    for (auto& [id, c] : conns)
      if (c->phase == Phase::kRead && !c->parser.started() &&
          (!oldest || c->idle_since < oldest->idle_since ||
           (c->idle_since == oldest->idle_since && c->id < oldest->id)))
        oldest = c.get();
    if (!oldest) return false;
    close_conn(oldest->id);
    return true;
  }

  void sweep(Clock::time_point now) {
    std::vector<uint64_t> expired, late;
    for (auto& [id, cp] : conns) {
      Conn& c = *cp;
      switch (c.phase) {
        case Phase::kRead:
          if (!c.parser.started()) {
            if (ms_since(c.idle_since, now) > opt.idle_timeout_ms) expired.push_back(id);
          } else if ((c.parser.state() == RequestParser::State::kHead &&
                      ms_since(c.request_start, now) > opt.header_timeout_ms) ||
                     ms_since(c.request_start, now) > opt.request_timeout_ms) {
            late.push_back(id);
          }
          break;
        case Phase::kWrite:
          if (ms_since(c.write_start, now) > opt.request_timeout_ms) {
            ++st_timeouts;
            expired.push_back(id);
          }
          break;
        case Phase::kLinger:
          if (now >= c.linger_until) expired.push_back(id);
          break;
        case Phase::kProcess:
          break;
      }
    }
    for (uint64_t id : expired) close_conn(id);
    for (uint64_t id : late) {
      Conn& c = *conns.at(id);
      bool head = c.parser.state() == RequestParser::State::kHead;
      refuse(c, 408,
             head ? "the request head did not arrive within " + std::to_string(opt.header_timeout_ms) + " ms"
                  : "the request did not arrive within " + std::to_string(opt.request_timeout_ms) + " ms",
             now);
    }
  }

  void take_done(Clock::time_point now) {
    std::deque<Done> ready;
    {
      std::lock_guard<std::mutex> g(done_mu);
      ready.swap(done);
    }
    for (auto& d : ready) {
      release_inflight(d.conn);
      auto it = conns.find(d.conn);
      if (it == conns.end()) continue;  // closed meanwhile (stop, or an error)
      Conn& c = *it->second;
      respond(c, d.res, !c.keep_alive, now);
    }
  }

  void worker() {
    for (;;) {
      Task t;
      {
        std::unique_lock<std::mutex> lk(task_mu);
        task_cv.wait(lk, [&] { return workers_stop || !tasks.empty(); });
        if (workers_stop) return;
        t = std::move(tasks.front());
        tasks.pop_front();
      }
      Response r;
      try {
        r = handler(t.req);
      } catch (const std::exception& e) {
        r = Server::error(500, std::string("internal error: ") + e.what());
      } catch (...) {
        r = Server::error(500, "internal error");
      }
      {
        std::lock_guard<std::mutex> g(done_mu);
        done.push_back({t.conn, std::move(r)});
      }
      wake();
    }
  }

  void loop() {
    std::vector<std::thread> workers;
    for (int i = 0; i < opt.threads; ++i) workers.emplace_back([this] { worker(); });
    epoll_event evs[256];
    auto last_sweep = Clock::now();
    while (!stopping) {
      int n = ::epoll_wait(epoll_fd, evs, 256, pending.empty() ? 100 : 0);
      auto now = Clock::now();
      for (int i = 0; i < n && !stopping; ++i) {
        uint64_t tag = evs[i].data.u64;
        if (tag == kListenTag) {
          accept_all(now);
        } else if (tag == kWakeTag) {
          uint64_t v;
          ssize_t r = ::read(wake_fd, &v, sizeof v);
          (void)r;
        } else {
          auto it = conns.find(tag);
          if (it == conns.end()) continue;
          Conn& c = *it->second;
          uint32_t ev = evs[i].events;
          if ((ev & EPOLLOUT) && (c.phase == Phase::kWrite || c.writing_interim)) on_writable(c, now);
          if (conns.find(tag) == conns.end()) continue;
          if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            if (c.phase == Phase::kRead || c.phase == Phase::kLinger) on_readable(tag, now);
            else if (ev & (EPOLLHUP | EPOLLERR)) close_conn(tag);
          }
        }
      }
      take_done(now);
      // One request per pipelining connection per turn: a client pipelining thousands of small
      // requests cannot hold the loop.
      std::vector<uint64_t> ids;
      ids.swap(pending);
      for (uint64_t id : ids) process_input(id, now);
      if (ms_since(last_sweep, now) >= 100) {
        sweep(now);
        last_sweep = now;
      }
      if (accept_paused_until && now >= *accept_paused_until) {
        epoll_event e{};
        e.events = EPOLLIN;
        e.data.u64 = kListenTag;
        ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, listen_fd, &e);
        accept_paused_until.reset();
      }
    }
    // Stopping: no new connections or answers; running handlers finish, queued ones are dropped.
    ::close(listen_fd);
    listen_fd = -1;
    std::vector<uint64_t> ids;
    for (auto& [id, c] : conns) ids.push_back(id);
    for (uint64_t id : ids) close_conn(id);
    {
      std::lock_guard<std::mutex> g(task_mu);
      workers_stop = true;
      tasks.clear();
    }
    task_cv.notify_all();
    for (auto& t : workers) t.join();
  }
};

Server::Server(ServerOptions options, HeadCheck check_head, Handler handler, ErrorHook on_error)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.opt = std::move(options);
  m.check_head = std::move(check_head);
  m.handler = std::move(handler);
  m.on_error = std::move(on_error);
  m.wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  m.epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (m.wake_fd < 0 || m.epoll_fd < 0) throw Error(std::string("http server: ") + std::strerror(errno));
  epoll_event e{};
  e.events = EPOLLIN;
  e.data.u64 = kWakeTag;
  ::epoll_ctl(m.epoll_fd, EPOLL_CTL_ADD, m.wake_fd, &e);
}

Server::~Server() { stop(); }

int Server::bind() {
  auto& m = *impl_;
  // Each connection is a descriptor; leave room for the model's files, logs and the like.
  const rlim_t need = static_cast<rlim_t>(m.opt.max_connections) + 128;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY && lim.rlim_cur < need) {
    rlimit raised = lim;
    raised.rlim_cur = lim.rlim_max == RLIM_INFINITY ? need : std::min(need, lim.rlim_max);
    ::setrlimit(RLIMIT_NOFILE, &raised);
    if (raised.rlim_cur < need)
      throw Error(std::to_string(m.opt.max_connections) + " connections need " + std::to_string(need) +
                  " file descriptors but this process may open " + std::to_string(raised.rlim_cur) +
                  " (ulimit -n): lower the connection limit or raise ulimit -n");
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(m.opt.port);
  int rc = ::getaddrinfo(m.opt.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) throw Error("cannot bind " + m.opt.host + ":" + port + " (" + ::gai_strerror(rc) + ")");
  std::string why = "no address";
  for (addrinfo* a = res; a; a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
      why = std::strerror(errno);
      ::close(fd);
      continue;
    }
    m.listen_fd = fd;
    break;
  }
  ::freeaddrinfo(res);
  if (m.listen_fd < 0) throw Error("cannot bind " + m.opt.host + ":" + port + " (" + why + ")");
  epoll_event e{};
  e.events = EPOLLIN;
  e.data.u64 = kListenTag;
  ::epoll_ctl(m.epoll_fd, EPOLL_CTL_ADD, m.listen_fd, &e);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(m.listen_fd, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

void Server::serve() {
  auto& m = *impl_;
  {
    std::lock_guard<std::mutex> g(m.life_mu);
    if (m.stopping || m.listen_fd < 0) return;
    m.serving = true;
  }
  m.loop();
  std::lock_guard<std::mutex> g(m.life_mu);
  m.serving = false;
  m.life_cv.notify_all();  // under the lock: a stop() that returns may destroy the server
}

void Server::stop() {
  auto& m = *impl_;
  std::unique_lock<std::mutex> lk(m.life_mu);
  m.stopping = true;
  m.wake();
  m.life_cv.wait(lk, [&] { return !m.serving; });
}

ServerStats Server::stats() const {
  const auto& m = *impl_;
  ServerStats s;
  s.connections_open = m.st_open;
  s.connections_total = m.st_total;
  s.connections_refused = m.st_refused;
  s.timeouts = m.st_timeouts;
  s.bad_requests = m.st_bad;
  s.buffered_bytes = m.buffered;
  return s;
}

}  // namespace ptk::http
