// Recipe files: JSON with comments and trailing commas, `"base": "other.json"` inheritance (path
// relative to the recipe), `key.path=value` overrides, bound to typed sections with every error of
// the recipe reported together, and a key repeated inside one file refused with its lines. Not the
// option declarations themselves (see sections.h).
#pragma once
#include <rapidjson/document.h>

#include <functional>
#include <iosfwd>
#include <map>
#include <string>
#include <vector>

#include "core/config/options.h"

namespace ptk::config {

// The merged JSON of a recipe, its base chain and the overrides, plus where each leaf came from.
struct RecipeJson {
  rapidjson::Document doc;
  std::map<std::string, std::string> origin;  // "optim.lr" -> "recipes/tiny/sft.json" | "command line"
  std::string file;                           // the recipe given on the command line ("" if none)
  RecipeJson() { doc.SetObject(); }
};

// Loads `path` (with its `base` chain) and applies `overrides` ("optim.lr=1e-5", "data.train=[\"a\"]";
// "stages[1].overrides.train.max_steps=5" reaches into an entry of a list the recipe has).
// An empty path starts from an empty recipe. Throws ptk::Error for unreadable or invalid files,
// base cycles, malformed overrides, and keys repeated inside one file of the chain (all of them,
// each with file, line and the line of its first occurrence).
RecipeJson load_recipe(const std::string& path, const std::vector<std::string>& overrides);

// Sets defaults, then binds `json` to `sections`: typed checks, unknown keys ("did you mean"),
// missing required keys, each section's validate(), then `extra_checks` (cross-section rules of a
// stage). Throws one ptk::Error listing every problem; a range check that names a key whose value
// was refused (wrong type, bad choice) is left out, since it would judge the default instead.
void bind_recipe(const RecipeJson& json, const std::vector<Section*>& sections,
                 const std::function<void(Errors&)>& extra_checks = {});

// The resolved recipe: every option of every section with its effective value (pretty JSON).
std::string resolved_json(const std::vector<Section*>& sections);

// `--help` text for the recipe sections: one line per option with type, default and help.
void print_help(std::ostream& os, const std::vector<Section*>& sections);

// Every declared key ("optim.lr", ...), e.g. for suggestions.
std::vector<std::string> all_keys(const std::vector<Section*>& sections);

}  // namespace ptk::config
