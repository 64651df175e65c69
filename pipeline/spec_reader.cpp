#include "pipeline/spec_reader.h"

#include <functional>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "core/util/strings.h"

namespace ptk::pipeline {

using rapidjson::Value;

namespace {
std::string join(const std::string& path, const std::string& name) { return path.empty() ? name : path + "." + name; }
}  // namespace

std::string SpecReader::where(const std::string& key) const {
  // An override of one list entry is recorded under its indexed path (stages[1].model_from).
  for (std::string k = key; k.find('[') != std::string::npos;) {
    auto it = json_.origin.find(k);
    if (it != json_.origin.end()) return it->second;
    size_t dot = k.rfind('.');
    if (dot == std::string::npos) break;
    k.resize(dot);
  }
  // Otherwise origin is keyed by dotted paths without list indices; walk up until a recorded prefix.
  std::string k = key;
  for (size_t b; (b = k.find('[')) != std::string::npos;) {
    size_t e = k.find(']', b);
    k.erase(b, e == std::string::npos ? std::string::npos : e - b + 1);
  }
  while (!k.empty()) {
    auto it = json_.origin.find(k);
    if (it != json_.origin.end()) return it->second;
    auto lo = json_.origin.lower_bound(k + ".");
    if (lo != json_.origin.end() && lo->first.rfind(k + ".", 0) == 0) return lo->second;
    size_t dot = k.rfind('.');
    if (dot == std::string::npos) break;
    k.resize(dot);
  }
  return json_.file.empty() ? "<recipe>" : json_.file;
}

void SpecReader::error(const std::string& key, const std::string& msg) {
  errors_.push_back(where(key) + ": " + key + ": " + msg);
}

void SpecReader::only_keys(const Value& obj, const std::string& path, const std::vector<std::string>& allowed) {
  if (!obj.IsObject()) return;
  for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it) {
    std::string name = it->name.GetString();
    bool ok = false;
    for (auto& a : allowed) ok |= a == name;
    if (ok) continue;
    std::string hint = nearest(name, allowed);
    std::string key = join(path, name);
    errors_.push_back(where(key) + ": unknown key " + key +
                      (hint.empty() ? "" : " (did you mean " + join(path, hint) + "?)") + "; known here: " +
                      [&] {
                        std::string s;
                        for (auto& a : allowed) s += (s.empty() ? "" : ", ") + a;
                        return s;
                      }());
  }
}

const Value* SpecReader::find(const Value& obj, const std::string& path, const char* name) {
  if (!obj.IsObject()) return nullptr;
  auto m = obj.FindMember(name);
  return m == obj.MemberEnd() ? nullptr : &m->value;
}

std::string SpecReader::str(const Value& obj, const std::string& path, const char* name, const std::string& def,
                            bool required) {
  const Value* v = find(obj, path, name);
  if (!v) {
    if (required) error(join(path, name), "missing (a string is required here)");
    return def;
  }
  if (!v->IsString()) {
    error(join(path, name), std::string("must be a string, got ") + json::type_name(*v) + " " + json::to_string(*v));
    return def;
  }
  return v->GetString();
}

int64_t SpecReader::integer(const Value& obj, const std::string& path, const char* name, int64_t def) {
  const Value* v = find(obj, path, name);
  if (!v) return def;
  if (!v->IsInt64()) {
    error(join(path, name), std::string("must be an integer, got ") + json::type_name(*v) + " " + json::to_string(*v));
    return def;
  }
  return v->GetInt64();
}

bool SpecReader::boolean(const Value& obj, const std::string& path, const char* name, bool def) {
  const Value* v = find(obj, path, name);
  if (!v) return def;
  if (!v->IsBool()) {
    error(join(path, name), std::string("must be true or false, got ") + json::to_string(*v));
    return def;
  }
  return v->GetBool();
}

std::string SpecReader::choice(const Value& obj, const std::string& path, const char* name, const std::string& def,
                               const std::vector<std::string>& choices, bool required) {
  std::string v = str(obj, path, name, def, required);
  if (v.empty() && !required) return v;
  for (auto& c : choices)
    if (c == v) return v;
  if (!v.empty()) {
    std::string all, hint = nearest(v, choices);
    for (auto& c : choices) all += (all.empty() ? "" : ", ") + c;
    error(join(path, name), "`" + v + "` is not one of " + all + (hint.empty() ? "" : " (did you mean `" + hint + "`?)"));
  }
  return def;
}

std::string override_arg(const std::string& key, const Value& v) { return key + "=" + json::to_string(v); }

std::vector<std::string> SpecReader::overrides(const Value& obj, const std::string& path, const char* name) {
  std::vector<std::string> out;
  const Value* v = find(obj, path, name);
  if (!v) return out;
  std::string key = join(path, name);
  if (!v->IsObject()) {
    error(key, std::string("must be an object {\"key.path\": value, ...}, got ") + json::type_name(*v));
    return out;
  }
  // Nested objects flatten ({"optim": {"lr": 1}} == {"optim.lr": 1}), so a command-line override
  // `overrides.optim.lr=1e-4` of this file reaches the stage recipe too.
  std::function<void(const Value&, const std::string&)> walk = [&](const Value& obj, const std::string& prefix) {
    for (auto it = obj.MemberBegin(); it != obj.MemberEnd(); ++it) {
      std::string k = it->name.GetString();
      if (k.empty() || k.find('=') != std::string::npos || k.front() == '.' || k.back() == '.') {
        error(key, "`" + k + "` is not a key path like optim.lr");
        continue;
      }
      std::string full = prefix.empty() ? k : prefix + "." + k;
      if (it->value.IsObject()) walk(it->value, full);
      else out.push_back(override_arg(full, it->value));
    }
  };
  walk(*v, "");
  return out;
}

std::string SpecReader::recipe_path(const Value& obj, const std::string& path, const char* name, bool required) {
  std::string key = join(path, name);
  std::string p = str(obj, path, name, "", required);
  if (p.empty()) return p;
  std::string from = where(key);
  std::string base = from == "command line" || from == "<recipe>" ? "." : parent_dir(from);
  std::string full = resolve_path(base, p);
  if (!path_exists(full)) {
    error(key, "`" + p + "` resolves to " + full +
                   ", which does not exist (recipe paths are relative to the file that names them, like `base`)");
    return "";
  }
  return full;
}

void SpecReader::throw_if_errors(const std::string& what) const {
  if (errors_.empty()) return;
  std::string msg = what + ": " + std::to_string(errors_.size()) + " problem" + (errors_.size() > 1 ? "s" : "") + ":";
  for (auto& e : errors_) msg += "\n  " + e;
  throw Error(msg);
}

}  // namespace ptk::pipeline
