// Raw HTTP over loopback sockets for tests that act as hostile clients: connect, send a few bytes,
// stall, read one answer with a deadline. Test code only; not a client (reward/reward_client.h).
#pragma once
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace ptk::test {

// A connected loopback socket to `port`, or -1.
inline int connect_loopback(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

inline bool send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

struct RawAnswer {
  int status = 0;  // 0: none within the deadline, or the connection closed first
  std::string head, body;
  bool closed = false;  // the server closed the connection after the answer
};

// Reads one answer (status line, headers, Content-Length body) within `timeout_ms`; then, if
// `wait_close`, waits (same deadline) for the server to close.
inline RawAnswer read_answer(int fd, int timeout_ms, bool wait_close = false) {
  RawAnswer a;
  auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  std::string buf;
  size_t need = std::string::npos;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::microseconds>(until - std::chrono::steady_clock::now());
    if (left.count() <= 0) return a;
    timeval tv{static_cast<time_t>(left.count() / 1000000), static_cast<suseconds_t>(left.count() % 1000000)};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char tmp[65536];
    ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
    if (n <= 0) {
      a.closed = true;
      if (a.status == 0 || need == std::string::npos || buf.size() < need) return a;
      break;
    }
    buf.append(tmp, static_cast<size_t>(n));
    if (a.status == 0) {
      size_t end = buf.find("\r\n\r\n");
      if (end == std::string::npos) continue;
      a.head = buf.substr(0, end);
      if (a.head.rfind("HTTP/1.1 100 ", 0) == 0) {  // interim answer: skip it
        buf.erase(0, end + 4);
        a.head.clear();
        continue;
      }
      a.status = std::stoi(a.head.substr(9, 3));
      size_t cl = a.head.find("Content-Length: ");
      size_t len = cl == std::string::npos ? 0 : std::stoul(a.head.substr(cl + 16));
      need = end + 4 + len;
    }
    if (buf.size() >= need) break;
  }
  a.body = buf.substr(a.head.size() + 4, need - a.head.size() - 4);
  if (wait_close && !a.closed) {
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::microseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      timeval tv{static_cast<time_t>(left.count() / 1000000), static_cast<suseconds_t>(left.count() % 1000000)};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      char tmp[4096];
      ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        a.closed = true;
        break;
      }
      if (n < 0 && errno != EINTR) break;  // the deadline
    }
  }
  return a;
}

// One whole request on a fresh connection; the answer within `timeout_ms`.
inline RawAnswer request(int port, const std::string& raw, int timeout_ms = 5000) {
  int fd = connect_loopback(port);
  if (fd < 0) return {};
  RawAnswer a = send_all(fd, raw) ? read_answer(fd, timeout_ms) : RawAnswer{};
  ::close(fd);
  return a;
}

// Opens `slow` connections that each start a request and then send one more header byte every
// `drip_ms` (slowloris) until destroyed, and `idle` connections that send nothing.
struct Attackers {
  std::vector<int> fds;
  std::atomic<bool> stop{false};
  std::thread drip;
  Attackers(int port, int slow, int idle, int drip_ms) {
    for (int i = 0; i < slow + idle; ++i) {
      int fd = connect_loopback(port);
      if (fd < 0) continue;
      if (i < slow) send_all(fd, "POST /get_reward HTTP/1.1\r\nX-Slow: ");
      fds.push_back(fd);
    }
    drip = std::thread([this, slow, drip_ms] {
      while (!stop) {
        for (int i = 0; i < slow && i < static_cast<int>(fds.size()); ++i) send_all(fds[static_cast<size_t>(i)], "a");
        for (int t = 0; t < drip_ms / 10 && !stop; ++t) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
  }
  ~Attackers() {
    stop = true;
    drip.join();
    for (int fd : fds) ::close(fd);
  }
};

}  // namespace ptk::test
