// `ptk launch -n N -- COMMAND ...`: starts N local ranks of COMMAND with torchrun's environment
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), splits the cores among
// them (OMP_NUM_THREADS), prefixes their output lines with the rank, forwards SIGINT/SIGTERM, and
// stops the others when one fails. Not multi-node (use torchrun or Slurm there), not elastic.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "apps/ptk/cli.h"
#include "core/util/error.h"

namespace ptk::app {
namespace {

namespace po = boost::program_options;
using Clock = std::chrono::steady_clock;

int g_signal_pipe[2] = {-1, -1};

void on_signal(int sig) {
  unsigned char b = static_cast<unsigned char>(sig);
  ssize_t n = ::write(g_signal_pipe[1], &b, 1);
  (void)n;
}

int free_port(const std::string& addr) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error("ptk launch: socket() failed: " + std::string(std::strerror(errno)));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = 0;
  if (::inet_pton(AF_INET, addr.c_str(), &a.sin_addr) != 1) a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    throw Error("ptk launch: cannot find a free port on " + addr + "\n---> HINT: pass --master-port");
  }
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

int usable_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

// One output stream of one rank: bytes in, whole prefixed lines out.
struct Stream {
  int fd = -1;
  int rank = 0;
  FILE* out = stdout;
  std::string partial;

  void emit(const char* data, size_t n) {
    partial.append(data, n);
    size_t start = 0, nl;
    while ((nl = partial.find('\n', start)) != std::string::npos) {
      std::fprintf(out, "[rank %d] %.*s\n", rank, static_cast<int>(nl - start), partial.data() + start);
      start = nl + 1;
    }
    partial.erase(0, start);
    std::fflush(out);
  }
  void close_stream() {
    if (!partial.empty()) {
      std::fprintf(out, "[rank %d] %s\n", rank, partial.c_str());
      partial.clear();
      std::fflush(out);
    }
    ::close(fd);
    fd = -1;
  }
};

struct Rank {
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // exit code, or 128 + signal
};

std::string describe(int status) {
  if (status > 128) return "was killed by signal " + std::to_string(status - 128) + " (" + strsignal(status - 128) + ")";
  return "exited with status " + std::to_string(status);
}

}  // namespace

int cmd_launch(int argc, char** argv) {
  // Everything after `--` is the command; the flags before it are launch's own.
  int dash = -1;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--")) {
      dash = i;
      break;
    }
  cli::CommandLine cl("launch", "ptk launch -n N [--master-port P] [--master-addr A] [--grace-s S] -- COMMAND [ARGS...]",
                      "Starts N local ranks of COMMAND with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,\n"
                      "LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and OMP_NUM_THREADS = cores / N (unless set).\n"
                      "Output lines are prefixed with `[rank K]`. SIGINT/SIGTERM are forwarded to every rank. When a\n"
                      "rank fails, the others get SIGTERM (SIGKILL after --grace-s) and launch exits with the failing\n"
                      "rank's status. Example: ptk launch -n 2 -- ptk sft --recipe recipes/tiny.json");
  cl.flags().add_options()
      ("nproc,n", po::value<int>()->default_value(1), "number of ranks to start on this machine")
      ("master-port", po::value<int>()->default_value(0), "TCP port of rank 0's rendezvous store; 0 picks a free one")
      ("master-addr", po::value<std::string>()->default_value("127.0.0.1"), "address the ranks rendezvous at")
      ("grace-s", po::value<double>()->default_value(10.0),
       "seconds the other ranks get after SIGTERM before SIGKILL");
  if (!cl.parse(dash < 0 ? argc : dash, argv)) return 0;
  if (dash < 0 || dash + 1 >= argc)
    throw UsageError("ptk launch: no command given\n---> HINT: ptk launch -n 2 -- ptk sft --recipe FILE");
  const int n = cl.get<int>("nproc");
  if (n < 1 || n > 1024) throw UsageError("ptk launch: -n " + std::to_string(n) + " must be between 1 and 1024");
  const std::string addr = cl.get<std::string>("master-addr");
  int port = cl.get<int>("master-port");
  if (port < 0 || port > 65535) throw UsageError("ptk launch: --master-port " + std::to_string(port) + " is not a port");
  if (port == 0) port = free_port(addr);
  const double grace = cl.get<double>("grace-s");
  const char* omp = std::getenv("OMP_NUM_THREADS");
  const std::string threads = omp && *omp ? std::string(omp) : std::to_string(std::max(1, usable_cores() / n));

  std::vector<char*> cmd;
  for (int i = dash + 1; i < argc; ++i) cmd.push_back(argv[i]);
  cmd.push_back(nullptr);

  if (::pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) throw Error("ptk launch: pipe() failed");
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  std::fprintf(stderr, "ptk launch: %d ranks, MASTER_ADDR=%s MASTER_PORT=%d OMP_NUM_THREADS=%s\n", n, addr.c_str(), port,
               threads.c_str());
  std::vector<Rank> ranks(n);
  std::vector<Stream> streams;
  for (int r = 0; r < n; ++r) {
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) throw Error("ptk launch: pipe() failed");
    std::vector<std::pair<std::string, std::string>> env = {
        {"RANK", std::to_string(r)},         {"WORLD_SIZE", std::to_string(n)},
        {"LOCAL_RANK", std::to_string(r)},   {"LOCAL_WORLD_SIZE", std::to_string(n)},
        {"GROUP_RANK", "0"},                 {"MASTER_ADDR", addr},
        {"MASTER_PORT", std::to_string(port)}, {"OMP_NUM_THREADS", threads}};
    pid_t pid = ::fork();
    if (pid < 0) throw Error("ptk launch: fork() failed: " + std::string(std::strerror(errno)));
    if (pid == 0) {
      // Own process group: a terminal's Ctrl-C reaches the ranks once, through the launcher.
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // the launcher died (even SIGKILL): stop too
      ::dup2(out[1], 1);
      ::dup2(err[1], 2);
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      sigaction(SIGINT, &dfl, nullptr);
      sigaction(SIGTERM, &dfl, nullptr);
      std::signal(SIGPIPE, SIG_DFL);
      for (auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
      ::execvp(cmd[0], cmd.data());
      std::fprintf(stderr, "ptk launch: cannot run `%s`: %s\n", cmd[0], std::strerror(errno));
      ::_exit(127);
    }
    ::close(out[1]);
    ::close(err[1]);
    ranks[r].pid = pid;
    ranks[r].running = true;
    streams.push_back(Stream{out[0], r, stdout, {}});
    streams.push_back(Stream{err[0], r, stderr, {}});
  }

  int failed_rank = -1, failed_status = 0, got_signal = 0;
  bool stopping = false;
  Clock::time_point kill_at{};
  // Each rank leads its own process group: signals reach what it started too (a shell's children).
  auto stop_others = [&](int sig) {
    for (auto& rk : ranks)
      if (rk.running) ::kill(-rk.pid, sig);
  };
  Clock::time_point all_exited{};
  char buf[65536];
  while (true) {
    bool any_running = false, any_open = false;
    for (auto& rk : ranks) any_running |= rk.running;
    for (auto& s : streams) any_open |= s.fd >= 0;
    if (!any_running && !any_open) break;
    // A rank's leftover children may hold its pipes open: once every rank is gone, drain for 2 s.
    if (!any_running) {
      if (all_exited == Clock::time_point{}) all_exited = Clock::now();
      if (Clock::now() - all_exited > std::chrono::seconds(2)) {
        for (auto& s : streams)
          if (s.fd >= 0) s.close_stream();
        break;
      }
    }
    std::vector<pollfd> fds;
    std::vector<Stream*> owners;
    for (auto& s : streams)
      if (s.fd >= 0) {
        fds.push_back({s.fd, POLLIN, 0});
        owners.push_back(&s);
      }
    fds.push_back({g_signal_pipe[0], POLLIN, 0});
    ::poll(fds.data(), fds.size(), 100);
    for (size_t i = 0; i + 1 < fds.size(); ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t k = ::read(fds[i].fd, buf, sizeof buf);
      if (k > 0) owners[i]->emit(buf, static_cast<size_t>(k));
      else if (k == 0 || (errno != EINTR && errno != EAGAIN)) owners[i]->close_stream();
    }
    unsigned char sig;
    while (::read(g_signal_pipe[0], &sig, 1) == 1) {
      got_signal = sig;
      std::fprintf(stderr, "ptk launch: got %s, forwarding it to the ranks\n", strsignal(sig));
      stop_others(sig);
      if (!stopping) {
        stopping = true;
        kill_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace * 1000));
      }
    }
    for (int r = 0; r < n; ++r) {
      if (!ranks[r].running) continue;
      int st = 0;
      if (::waitpid(ranks[r].pid, &st, WNOHANG) != ranks[r].pid) continue;
      ranks[r].running = false;
      ranks[r].status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      if (ranks[r].status != 0 && failed_rank < 0 && !stopping) {
        failed_rank = r;
        failed_status = ranks[r].status;
        std::fprintf(stderr, "ptk launch: rank %d %s; stopping the other ranks (SIGTERM, SIGKILL after %g s)\n", r,
                     describe(ranks[r].status).c_str(), grace);
        stop_others(SIGTERM);
        stopping = true;
        kill_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace * 1000));
      }
    }
    if (stopping && Clock::now() > kill_at) {
      bool any = false;
      for (auto& rk : ranks) any |= rk.running;
      if (any) {
        std::fprintf(stderr, "ptk launch: ranks still running after %g s; sending SIGKILL\n", grace);
        stop_others(SIGKILL);
      }
      kill_at = Clock::now() + std::chrono::hours(24);
    }
  }
  if (failed_rank >= 0) {
    std::fprintf(stderr, "ptk launch: failed: rank %d %s\n", failed_rank, describe(failed_status).c_str());
    return failed_status;
  }
  if (got_signal) return 128 + got_signal;
  return 0;
}

}  // namespace ptk::app
