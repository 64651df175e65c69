// The table of `ptk` subcommands. Not their logic (cmd_<name>.cpp).
#pragma once
#include <vector>

namespace ptk::app {

struct Command {
  const char* name;
  const char* summary;                // one line for `ptk --help`
  int (*run)(int argc, char** argv);
};

const std::vector<Command>& commands();

}  // namespace ptk::app
