// `ptk` entry point: dispatches to a subcommand and turns errors into messages and exit codes
// (0 ok, 1 error, 2 usage). Not command logic.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include "apps/ptk/commands.h"
#include "core/train/rerun.h"
#include "core/util/error.h"
#include "core/util/strings.h"

namespace {

void print_usage(std::ostream& os) {
  os << "ptk — post-training toolkit for Qwen2.5 models (SFT, DPO, GRPO) on LibTorch\n\n"
        "usage: ptk <command> [--recipe FILE] [flags] [key.path=value ...]\n"
        "       ptk <command> --help\n\ncommands:\n";
  for (const auto& c : ptk::app::commands()) {
    std::string name = c.name;
    os << "  " << name << std::string(name.size() < 15 ? 15 - name.size() : 1, ' ') << c.summary << "\n";
  }
  os << "\nSee README.md for the quick start and the status of each command.\n";
}

// Environment that native libraries read when they are loaded (before main), so ptk sets it and
// re-executes itself once; a variable the user already set is left alone.
// - OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while waiting (libgomp's default) collapse when
//   the cores are shared: on this 2-core machine with other work running, a tiny SFT step took
//   3-16 s with 2 spinning threads against 0.7-0.8 s with 1 thread or 2 passive ones.
//   (OMP_WAIT_POLICY=ACTIVE keeps spinning, for a dedicated machine.)
void ensure_library_environment(char** argv) {
  bool changed = false;
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    changed = true;
  }
  if (changed) ::execv("/proc/self/exe", argv);  // returns only on failure: carry on as we are
}

}  // namespace

int main(int argc, char** argv) {
  ensure_library_environment(argv);
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_usage(std::cout);
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::cout << "ptk 0.1.0\n";
    return 0;
  }
  std::string name = argv[1];
  for (const auto& c : ptk::app::commands()) {
    if (name != c.name) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const ptk::train::RunAlreadyFinished& e) {
      std::cout << e.what() << "\n";  // nothing to do is not an error
      return 0;
    } catch (const ptk::UsageError& e) {
      std::cerr << "error: " << e.what() << "\n";
      return 2;
    } catch (const ptk::Error& e) {
      std::cerr << "error: " << e.what() << "\n";
      return 1;
    } catch (const std::exception& e) {
      std::cerr << "internal error in ptk " << name << ": " << e.what() << "\n";
      return 1;
    }
  }
  std::vector<std::string> names;
  for (const auto& c : ptk::app::commands()) names.push_back(c.name);
  std::string hint = ptk::nearest(name, names);
  std::cerr << "ptk: unknown command `" << name << "`" << (hint.empty() ? "" : " (did you mean `" + hint + "`?)")
            << "\n---> HINT: ptk --help lists the commands\n";
  return 2;
}
