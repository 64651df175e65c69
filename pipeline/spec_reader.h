// Reads the hand-written parts of pipeline and sweep recipes (stage lists, grids, eval settings)
// from a loaded recipe, collecting every problem as "<file>: <key>: <what> (<how to fix>)" and
// throwing them together. Not the typed stage sections (core/config binds those in each stage).
#pragma once
#include <rapidjson/document.h>

#include <string>
#include <vector>

#include "core/config/recipe.h"  // RecipeJson

namespace ptk::pipeline {

class SpecReader {
 public:
  explicit SpecReader(const config::RecipeJson& json) : json_(json) {}
  const rapidjson::Value& root() const { return json_.doc; }

  // The file a key came from (through `base` chains; "command line" for overrides).
  std::string where(const std::string& key) const;
  void error(const std::string& key, const std::string& msg);
  // Reports keys of `obj` (at `path`) outside `allowed`, with a "did you mean" suggestion.
  void only_keys(const rapidjson::Value& obj, const std::string& path, const std::vector<std::string>& allowed);

  // Typed getters: absent -> `def` (or an error when `required`); wrong type -> an error.
  const rapidjson::Value* find(const rapidjson::Value& obj, const std::string& path, const char* name);
  std::string str(const rapidjson::Value& obj, const std::string& path, const char* name, const std::string& def,
                  bool required = false);
  int64_t integer(const rapidjson::Value& obj, const std::string& path, const char* name, int64_t def);
  bool boolean(const rapidjson::Value& obj, const std::string& path, const char* name, bool def);
  // A string restricted to `choices` (did-you-mean on a typo).
  std::string choice(const rapidjson::Value& obj, const std::string& path, const char* name, const std::string& def,
                     const std::vector<std::string>& choices, bool required = false);
  // {"key.path": value, ...} -> {"key.path=<value as JSON>", ...}, in file order.
  std::vector<std::string> overrides(const rapidjson::Value& obj, const std::string& path, const char* name);
  // A recipe path relative to the recipe file that names it (like `base`); it must exist.
  std::string recipe_path(const rapidjson::Value& obj, const std::string& path, const char* name, bool required);

  // Throws one ptk::Error listing every problem (nothing when there were none).
  void throw_if_errors(const std::string& what) const;

 private:
  const config::RecipeJson& json_;
  std::vector<std::string> errors_;
};

// "key.path=<value>" for one override value (strings quoted, so "1e-3" stays a string).
std::string override_arg(const std::string& key, const rapidjson::Value& v);

}  // namespace ptk::pipeline
