#include "apps/ptk/cli.h"

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <iostream>

#include "core/config/recipe.h"
#include "core/util/error.h"

namespace po = boost::program_options;

namespace ptk::cli {

CommandLine::CommandLine(std::string name, std::string usage, std::string about)
    : name_(std::move(name)), usage_(std::move(usage)), about_(std::move(about)), flags_("Flags", 100, 50) {
  flags_.add_options()("help,h", "print this help and exit")(
      "threads", po::value<int>(&threads_)->default_value(0),
      "CPU threads; 0 = $OMP_NUM_THREADS, else every core");
}

void CommandLine::accept_recipe(std::vector<config::Section*> sections) {
  takes_recipe_ = true;
  sections_ = std::move(sections);
  flags_.add_options()("recipe", po::value<std::string>(&recipe_),
                       "recipe JSON (comments, trailing commas and \"base\": \"other.json\" allowed)");
}

void CommandLine::accept_chat_template() {
  takes_chat_template_ = true;
  flags_.add_options()(
      "chat-template", po::value<std::string>(),
      "chat template: auto (the tokenizer folder's own) | qwen2.5 | chatml | a .jinja file; same as "
      "tokenizer.chat_template")(
      "chat-template-kwargs", po::value<std::string>(),
      "extra template variables as a JSON object, e.g. '{\"enable_thinking\": false}'; same as "
      "tokenizer.chat_template_kwargs");
}

std::string CommandLine::chat_template() const {
  return vm_.count("chat-template") ? vm_["chat-template"].as<std::string>() : std::string("auto");
}

std::string CommandLine::chat_template_kwargs() const {
  return vm_.count("chat-template-kwargs") ? vm_["chat-template-kwargs"].as<std::string>() : std::string();
}

void CommandLine::accept_check() {
  flags_.add_options()("check", "validate the recipe (keys, values, cross-field rules, model.config) and exit; "
                                "reads no weights or data, runs nothing");
}

void CommandLine::report_valid() const {
  std::cout << name_ << ": " << (recipe_.empty() ? std::string("the recipe") : recipe_)
            << " is valid (--check: nothing was run)" << std::endl;
}

bool CommandLine::parse(int argc, char** argv) {
  po::options_description hidden;
  hidden.add_options()("override", po::value<std::vector<std::string>>(), "");
  po::options_description all;
  all.add(flags_).add(hidden);
  po::positional_options_description pos;
  pos.add("override", -1);
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm_);
    if (vm_.count("help")) {
      print_help(std::cout);
      return false;
    }
    po::notify(vm_);
  } catch (const po::error& e) {
    throw UsageError("ptk " + name_ + ": " + e.what() + "\n---> HINT: ptk " + name_ + " --help");
  }
  if (vm_.count("override")) {
    overrides_ = vm_["override"].as<std::vector<std::string>>();
    for (auto& ov : overrides_) {
      if (!takes_recipe_)
        throw UsageError("ptk " + name_ + ": unexpected argument `" + ov + "`\n---> HINT: ptk " + name_ + " --help");
      if (ov.find('=') == std::string::npos)
        throw UsageError("ptk " + name_ + ": `" + ov +
                         "` is neither a flag nor a key.path=value override\n---> HINT: ptk " + name_ + " --help");
    }
  }
  if (takes_chat_template_ && takes_recipe_) {
    // As JSON strings, so a value that parses as JSON (a number-like file name) stays a string.
    auto quoted = [](const std::string& v) {
      rapidjson::StringBuffer sb;
      rapidjson::Writer<rapidjson::StringBuffer> w(sb);
      w.String(v.data(), static_cast<rapidjson::SizeType>(v.size()));
      return std::string(sb.GetString(), sb.GetSize());
    };
    if (vm_.count("chat-template")) overrides_.push_back("tokenizer.chat_template=" + quoted(chat_template()));
    if (vm_.count("chat-template-kwargs"))
      overrides_.push_back("tokenizer.chat_template_kwargs=" + quoted(chat_template_kwargs()));
  }
  return true;
}

void CommandLine::print_help(std::ostream& os) const {
  os << "usage: " << usage_ << "\n\n" << about_ << "\n\n" << flags_;
  if (takes_recipe_) {
    os << "\nRecipe keys (set in the recipe file or as key.path=value after the flags):\n";
    config::print_help(os, sections_);
  }
}

}  // namespace ptk::cli
