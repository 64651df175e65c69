// Command-line plumbing shared by every `ptk` subcommand: flags declared once with
// Boost.Program_options (name, default, help -> parsing and --help), `key.path=value` recipe
// overrides, --recipe/--threads, and the recipe sections listed under --help.
// Not command logic: each command lives in its own cmd_<name>.cpp.
#pragma once
#include <boost/program_options.hpp>

#include <string>
#include <vector>

#include "core/config/options.h"

namespace ptk::cli {

class CommandLine {
 public:
  // `usage` e.g. "ptk sft --recipe FILE [key.path=value ...]"; `about` a few lines.
  CommandLine(std::string name, std::string usage, std::string about);

  // Flags of this command (add with flags().add_options()(...)). --help and --threads are built in.
  boost::program_options::options_description& flags() { return flags_; }
  // Adds --recipe FILE and accepts positional `key.path=value` overrides.
  void accept_recipe(std::vector<config::Section*> sections);
  // Adds --chat-template NAME|FILE and --chat-template-kwargs JSON. With a recipe they become the
  // overrides tokenizer.chat_template=... and tokenizer.chat_template_kwargs=... (after the positional
  // ones); commands without a recipe read chat_template() / chat_template_kwargs().
  void accept_chat_template();
  std::string chat_template() const;         // the flag, else "auto"
  std::string chat_template_kwargs() const;  // the flag, else ""
  // Adds --check: the command validates its recipe (load, bind, cross-checks) and exits before it
  // reads any weights or data; check_only() says whether it was given.
  void accept_check();
  bool check_only() const { return vm_.count("check") > 0; }
  // The line a --check run ends with: "<name>: <recipe> is valid (--check: nothing was run)".
  void report_valid() const;

  // Parses; returns false when --help was printed (the command returns 0).
  // Throws ptk::UsageError for unknown flags or bad values.
  bool parse(int argc, char** argv);

  const boost::program_options::variables_map& vm() const { return vm_; }
  template <class T>
  T get(const char* name) const { return vm_[name].as<T>(); }
  bool has(const char* name) const { return vm_.count(name) && !vm_[name].defaulted(); }

  const std::string& recipe() const { return recipe_; }
  const std::vector<std::string>& overrides() const { return overrides_; }
  int threads() const { return threads_; }

  void print_help(std::ostream& os) const;

 private:
  std::string name_, usage_, about_;
  boost::program_options::options_description flags_;
  std::vector<config::Section*> sections_;
  bool takes_recipe_ = false;
  bool takes_chat_template_ = false;
  boost::program_options::variables_map vm_;
  std::string recipe_;
  std::vector<std::string> overrides_;
  int threads_ = 0;
};

}  // namespace ptk::cli
