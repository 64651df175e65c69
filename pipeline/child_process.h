// Child processes for `ptk pipeline` and `ptk sweep`: start a command in its own process group,
// stream its output line by line with a `[label]` prefix (and keep the last lines for error
// messages), forward SIGINT/SIGTERM to every live child, reap exits. Not a shell: argv only, no
// quoting or redirection; not a job scheduler (the callers decide what runs when).
//
// Threading: one thread (the caller's) drives everything through pump(); signal handlers only
// write a byte to a self-pipe. A Child is owned by its creator; destroying a running Child sends
// SIGTERM to its group and waits for it.
#pragma once
#include <sys/types.h>

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace ptk::proc {

struct ChildSpec {
  std::vector<std::string> argv;                           // argv[0] is a path (no PATH search)
  std::string label;                                       // output prefix "[label] "; "" = none
  std::vector<std::pair<std::string, std::string>> env;    // set in the child (e.g. OMP_NUM_THREADS)
  std::function<void(const std::string& line)> on_line;    // each stdout/stderr line, after printing
};

class Child {
 public:
  // Forks and execs; the child leads its own process group and gets SIGTERM when this process dies.
  // Throws ptk::Error when fork/pipe fail (an exec failure shows as exit status 127 with a message).
  explicit Child(ChildSpec spec);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  bool running() const { return running_; }
  // Exit code, or 128 + signal number when killed; valid once !running().
  int status() const { return status_; }
  // The last lines of output (at most 80), for error messages.
  std::string tail(size_t lines = 20) const;
  // "exited with status 2" / "was killed by signal 9 (Killed)".
  std::string describe() const;
  const std::string& label() const { return spec_.label; }
  std::string command_line() const;  // argv joined by spaces, for messages

  // Sends `sig` to the child's process group (no-op once it has exited).
  void signal(int sig);
  // The output pipes still open (-1 once closed).
  int out_fd() const { return out_.fd; }
  int err_fd() const { return err_.fd; }

 private:
  friend int pump(const std::vector<Child*>&, int);
  struct Stream {
    int fd = -1;
    bool is_err = false;
    std::string partial;
  };
  void emit(Stream& s, const char* data, size_t n);
  void flush_partial(Stream& s);
  bool reap();  // true when it just exited

  ChildSpec spec_;
  pid_t pid_ = -1;
  bool running_ = false;
  int status_ = 0;
  Stream out_, err_;
  std::deque<std::string> tail_;
};

// Installs SIGINT/SIGTERM handlers that record the signal (once per process; idempotent).
void install_signal_handlers();
// The first stop signal received since install (SIGINT/SIGTERM), or 0.
int stop_signal();

// Waits up to `timeout_ms` for output, exits or a stop signal; prints output, reaps children that
// exited, and forwards a newly received stop signal to every running child in `children`. Returns
// the number of children in `children` still running. Children whose output pipes are closed and
// that exited are finished.
int pump(const std::vector<Child*>& children, int timeout_ms);

// Pumps until `child` exits (other children in `also` keep streaming and get signals too). After a
// stop signal, children get `grace_s` seconds before SIGKILL. Returns child.status().
int wait_for(Child& child, const std::vector<Child*>& also = {}, double grace_s = 30);

// Stops `child`: SIGTERM to its group, SIGKILL after `grace_s`; returns its status.
int stop(Child& child, double grace_s = 10);

// Path of the running executable (/proc/self/exe), so stages run the same `ptk`.
std::string self_exe();

// Usable cores (sched_getaffinity).
int usable_cores();

}  // namespace ptk::proc
