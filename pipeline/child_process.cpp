#include "pipeline/child_process.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "core/util/error.h"

namespace ptk::proc {
namespace {

int g_pipe[2] = {-1, -1};
volatile sig_atomic_t g_stop_signal = 0;
int g_forwarded = 0;  // the stop signal already forwarded to the children (0 = none)

void on_signal(int sig) {
  if (!g_stop_signal) g_stop_signal = sig;
  unsigned char b = static_cast<unsigned char>(sig);
  ssize_t n = ::write(g_pipe[1], &b, 1);
  (void)n;
}

constexpr size_t kTailLines = 80;

}  // namespace

void install_signal_handlers() {
  if (g_pipe[0] >= 0) return;
  if (::pipe2(g_pipe, O_CLOEXEC | O_NONBLOCK) != 0) throw Error("cannot create the signal pipe: " + std::string(std::strerror(errno)));
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

int stop_signal() { return g_stop_signal; }

Child::Child(ChildSpec spec) : spec_(std::move(spec)) {
  if (spec_.argv.empty()) throw Error("internal: empty command line for a child process");
  install_signal_handlers();
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) throw Error("pipe() failed: " + std::string(std::strerror(errno)));
  if (::pipe2(err, O_CLOEXEC) != 0) throw Error("pipe() failed: " + std::string(std::strerror(errno)));
  std::vector<char*> argv;
  for (auto& a : spec_.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(stdout);
  std::fflush(stderr);
  pid_ = ::fork();
  if (pid_ < 0) throw Error("fork() failed: " + std::string(std::strerror(errno)));
  if (pid_ == 0) {
    // Own process group: signals reach what the stage starts too (ptk launch ranks), and a
    // terminal's Ctrl-C reaches the child once, through us.
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGINT, &dfl, nullptr);
    sigaction(SIGTERM, &dfl, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    for (auto& [k, v] : spec_.env) ::setenv(k.c_str(), v.c_str(), 1);
    ::execv(argv[0], argv.data());
    std::fprintf(stderr, "cannot run `%s`: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);  // also from the parent: no race with an early signal()
  ::close(out[1]);
  ::close(err[1]);
  out_.fd = out[0];
  err_.fd = err[0];
  err_.is_err = true;
  running_ = true;
  // A stop signal that arrived before this child existed reaches it too.
  if (g_forwarded) signal(g_forwarded);
}

Child::~Child() {
  if (running_) stop(*this, 5);
  for (Stream* s : {&out_, &err_})
    if (s->fd >= 0) ::close(s->fd);
}

void Child::emit(Stream& s, const char* data, size_t n) {
  s.partial.append(data, n);
  size_t start = 0, nl;
  while ((nl = s.partial.find('\n', start)) != std::string::npos) {
    std::string line = s.partial.substr(start, nl - start);
    start = nl + 1;
    // Progress bars redraw with '\r': keep the last redraw only.
    size_t cr = line.find_last_of('\r', line.size() >= 1 ? line.size() - 1 : 0);
    if (cr != std::string::npos && cr + 1 < line.size()) line = line.substr(cr + 1);
    FILE* f = s.is_err ? stderr : stdout;
    if (spec_.label.empty()) std::fprintf(f, "%s\n", line.c_str());
    else std::fprintf(f, "[%s] %s\n", spec_.label.c_str(), line.c_str());
    std::fflush(f);
    tail_.push_back(line);
    if (tail_.size() > kTailLines) tail_.pop_front();
    if (spec_.on_line) spec_.on_line(line);
  }
  s.partial.erase(0, start);
}

void Child::flush_partial(Stream& s) {
  if (!s.partial.empty()) emit(s, "\n", 1);
}

bool Child::reap() {
  if (!running_) return false;
  int st = 0;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r != pid_) return false;
  running_ = false;
  status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return true;
}

std::string Child::tail(size_t lines) const {
  std::string out;
  size_t from = tail_.size() > lines ? tail_.size() - lines : 0;
  for (size_t i = from; i < tail_.size(); ++i) out += "    " + tail_[i] + "\n";
  return out;
}

std::string Child::describe() const {
  if (status_ > 128) {
    int sig = status_ - 128;
    return "was killed by signal " + std::to_string(sig) + " (" + strsignal(sig) + ")";
  }
  return "exited with status " + std::to_string(status_);
}

std::string Child::command_line() const {
  std::string s;
  for (auto& a : spec_.argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

void Child::signal(int sig) {
  if (running_) ::kill(-pid_, sig);
}

int pump(const std::vector<Child*>& children, int timeout_ms) {
  std::vector<pollfd> fds;
  std::vector<std::pair<Child*, Child::Stream*>> owners;
  for (Child* c : children)
    for (Child::Stream* s : {&c->out_, &c->err_})
      if (s->fd >= 0) {
        fds.push_back({s->fd, POLLIN, 0});
        owners.push_back({c, s});
      }
  fds.push_back({g_pipe[0], POLLIN, 0});
  ::poll(fds.data(), fds.size(), timeout_ms);
  char buf[65536];
  for (size_t i = 0; i + 1 < fds.size(); ++i) {
    if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
    auto [c, s] = owners[i];
    ssize_t k = ::read(s->fd, buf, sizeof buf);
    if (k > 0) {
      c->emit(*s, buf, static_cast<size_t>(k));
    } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
      c->flush_partial(*s);
      ::close(s->fd);
      s->fd = -1;
    }
  }
  unsigned char b;
  while (::read(g_pipe[0], &b, 1) == 1) {
  }
  if (g_stop_signal && g_forwarded != g_stop_signal) {
    g_forwarded = g_stop_signal;
    std::fprintf(stderr, "ptk: got %s, forwarding it to the running stages\n", strsignal(g_stop_signal));
    for (Child* c : children) c->signal(g_stop_signal);
  }
  int running = 0;
  for (Child* c : children) {
    c->reap();
    running += c->running_;
  }
  return running;
}

namespace {

// Pumps until `child` exited and its pipes closed (output from leftover grandchildren is drained
// for at most 2 s after the exit).
int finish(Child& child, const std::vector<Child*>& all, double grace_s, bool stop_now) {
  using Clock = std::chrono::steady_clock;
  Clock::time_point kill_at = Clock::time_point::max(), exited_at{};
  auto arm = [&] {
    if (kill_at == Clock::time_point::max())
      kill_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
  };
  if (stop_now) {
    child.signal(SIGTERM);
    arm();
  }
  while (true) {
    pump(all, 100);
    if (stop_signal()) arm();
    if (child.running() && Clock::now() > kill_at) {
      std::fprintf(stderr, "ptk: `%s` still running %g s after the stop signal; sending SIGKILL\n",
                   child.label().c_str(), grace_s);
      child.signal(SIGKILL);
      kill_at = Clock::now() + std::chrono::hours(24);
    }
    if (!child.running()) {
      if (exited_at == Clock::time_point{}) exited_at = Clock::now();
      bool open = false;
      // Reading through pump() above; here only decide when to stop waiting.
      for (int fd : {child.out_fd(), child.err_fd()}) open |= fd >= 0;
      if (!open || Clock::now() - exited_at > std::chrono::seconds(2)) break;
    }
  }
  return child.status();
}

}  // namespace

int wait_for(Child& child, const std::vector<Child*>& also, double grace_s) {
  std::vector<Child*> all = also;
  all.insert(all.begin(), &child);
  return finish(child, all, grace_s, false);
}

int stop(Child& child, double grace_s) {
  if (!child.running()) return finish(child, {&child}, grace_s, false);
  return finish(child, {&child}, grace_s, true);
}

std::string self_exe() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw Error("cannot read /proc/self/exe: " + std::string(std::strerror(errno)));
  return std::string(buf, static_cast<size_t>(n));
}

int usable_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

}  // namespace ptk::proc
