#include "core/config/recipe.h"

#include <rapidjson/document.h>
#include <rapidjson/memorystream.h>
#include <rapidjson/reader.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <ostream>
#include <set>
#include <sstream>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "core/util/strings.h"

namespace ptk::config {
namespace {

using rapidjson::Value;
using Alloc = rapidjson::Document::AllocatorType;

std::string join_path(const std::string& a, const std::string& b) { return a.empty() ? b : a + "." + b; }

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : path) {
    if (c == '.') {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

// Records `origin` for every leaf under `v` (objects are walked, anything else is a leaf).
void mark_origin(const Value& v, const std::string& path, const std::string& origin,
                 std::map<std::string, std::string>* out) {
  if (v.IsObject() && v.MemberCount() > 0) {
    for (auto it = v.MemberBegin(); it != v.MemberEnd(); ++it)
      mark_origin(it->value, join_path(path, it->name.GetString()), origin, out);
  } else if (!path.empty()) {
    // A leaf replaces anything recorded beneath it.
    for (auto it = out->lower_bound(path + "."); it != out->end() && it->first.rfind(path + ".", 0) == 0;)
      it = out->erase(it);
    (*out)[path] = origin;
  }
}

// Deep merge: objects merge key by key; anything else replaces.
void merge_into(Value& dst, const Value& src, Alloc& a) {
  for (auto it = src.MemberBegin(); it != src.MemberEnd(); ++it) {
    auto d = dst.FindMember(it->name);
    if (d != dst.MemberEnd() && d->value.IsObject() && it->value.IsObject()) {
      merge_into(d->value, it->value, a);
    } else if (d != dst.MemberEnd()) {
      d->value.CopyFrom(it->value, a);
    } else {
      Value k(it->name, a);
      Value v(it->value, a);
      dst.AddMember(k, v, a);
    }
  }
}

// True when some object under `root` names a member twice. Iterative, so a deep document cannot
// exhaust the stack here.
bool has_duplicate_keys(const Value& root) {
  std::vector<const Value*> todo{&root};
  std::set<std::string> names;
  while (!todo.empty()) {
    const Value* v = todo.back();
    todo.pop_back();
    if (v->IsObject()) {
      names.clear();
      for (auto it = v->MemberBegin(); it != v->MemberEnd(); ++it) {
        if (!names.emplace(it->name.GetString(), it->name.GetStringLength()).second) return true;
        todo.push_back(&it->value);
      }
    } else if (v->IsArray()) {
      for (auto& e : v->GetArray()) todo.push_back(&e);
    }
  }
  return false;
}

// Walks the recipe text (already known to be valid relaxed JSON) with a SAX reader to find where
// each repeated key sits: "<file>:<line>: duplicate key optim.lr (first on line 3)". The reader is
// iterative and the path stack lives on the heap.
class DuplicateKeyFinder : public rapidjson::BaseReaderHandler<rapidjson::UTF8<>, DuplicateKeyFinder> {
 public:
  DuplicateKeyFinder(const std::string& text, const std::string& file) : text_(text), file_(file) {
    for (size_t i = 0; i < text.size(); ++i)
      if (text[i] == '\n') newlines_.push_back(i);
  }
  std::vector<std::string> run() {
    rapidjson::MemoryStream ms(text_.data(), text_.size());
    stream_ = &ms;
    rapidjson::Reader reader;
    constexpr unsigned kFlags = rapidjson::kParseCommentsFlag | rapidjson::kParseTrailingCommasFlag |
                                rapidjson::kParseNanAndInfFlag | rapidjson::kParseIterativeFlag;
    reader.Parse<kFlags>(ms, *this);
    stream_ = nullptr;
    return errors_;
  }

  bool Default() {
    child_path();
    return true;
  }
  bool StartObject() {
    frames_.push_back({true, child_path(), {}, {}, 0});
    return true;
  }
  bool Key(const char* str, rapidjson::SizeType len, bool) {
    Frame& f = frames_.back();
    f.key.assign(str, len);
    const size_t line = line_of(stream_->Tell());
    auto [it, fresh] = f.seen.emplace(f.key, line);
    if (!fresh)
      errors_.push_back(file_ + ":" + std::to_string(line) + ": duplicate key " + join_path(f.path, f.key) +
                        " (first on line " + std::to_string(it->second) + ")");
    return true;
  }
  bool EndObject(rapidjson::SizeType) {
    frames_.pop_back();
    return true;
  }
  bool StartArray() {
    frames_.push_back({false, child_path(), {}, {}, 0});
    return true;
  }
  bool EndArray(rapidjson::SizeType) {
    frames_.pop_back();
    return true;
  }

 private:
  struct Frame {
    bool object;
    std::string path;
    std::map<std::string, size_t> seen;  // key -> line of its first occurrence
    std::string key;                     // the member whose value comes next
    int64_t index;                       // arrays: the next element's index
  };
  // The path of the value about to start ("optim.lr", "data.train[1].path").
  std::string child_path() {
    if (frames_.empty()) return "";
    Frame& f = frames_.back();
    if (f.object) return join_path(f.path, f.key);
    return f.path + "[" + std::to_string(f.index++) + "]";
  }
  size_t line_of(size_t offset) const {
    return static_cast<size_t>(std::lower_bound(newlines_.begin(), newlines_.end(), offset) - newlines_.begin()) + 1;
  }

  const std::string& text_;
  const std::string& file_;
  std::vector<size_t> newlines_;
  rapidjson::MemoryStream* stream_ = nullptr;
  std::vector<Frame> frames_;
  std::vector<std::string> errors_;
};

// `duplicates` collects every repeated key of every file in the chain (one error for them all).
void load_chain(const std::string& path, RecipeJson* out, std::vector<std::string>* stack,
                std::vector<std::string>* duplicates) {
  if (std::find(stack->begin(), stack->end(), path) != stack->end()) {
    std::string chain;
    for (auto& s : *stack) chain += s + " -> ";
    throw Error("recipe base cycle: " + chain + path);
  }
  stack->push_back(path);
  rapidjson::Document doc = json::parse_file(path, json::Syntax::kRelaxed);
  if (!doc.IsObject()) throw Error(path + ": a recipe must be a JSON object, got " + json::type_name(doc));
  // JSON parsers keep one value of a repeated key (the merge below would keep the last): a recipe
  // that sets a key twice is refused with both lines. Keys repeated across the base chain and the
  // overrides are layering, not duplicates.
  if (has_duplicate_keys(doc)) {
    auto found = DuplicateKeyFinder(read_file(path), path).run();
    duplicates->insert(duplicates->end(), found.begin(), found.end());
  }
  auto base = doc.FindMember("base");
  if (base != doc.MemberEnd()) {
    if (!base->value.IsString())
      throw Error(path + ": `base` must be a string (a recipe path relative to this file), got " +
                  json::type_name(base->value));
    std::string base_path = resolve_path(parent_dir(path), base->value.GetString());
    if (!path_exists(base_path))
      throw Error(path + ": `base` names " + base_path + ", which does not exist");
    load_chain(base_path, out, stack, duplicates);
    doc.RemoveMember("base");
  }
  merge_into(out->doc, doc, out->doc.GetAllocator());
  mark_origin(doc, "", path, &out->origin);
  stack->pop_back();
}

void apply_override(const std::string& ov, RecipeJson* out) {
  auto eq = ov.find('=');
  if (eq == std::string::npos || eq == 0)
    throw UsageError("override `" + ov + "` is not of the form key.path=value (e.g. optim.lr=1e-5)");
  std::string key = ov.substr(0, eq);
  std::string text = ov.substr(eq + 1);
  Alloc& a = out->doc.GetAllocator();
  Value val;
  // JSON when it parses (numbers, bools, lists, quoted strings); otherwise the raw text as a string.
  rapidjson::Document parsed;
  json::ParseStatus st = json::parse_into(parsed, text);
  if (st.too_deep) throw UsageError("override `" + key + "`: invalid JSON: " + st.message());
  if (st.ok() && !text.empty()) {
    val.CopyFrom(parsed, a);
  } else {
    val.SetString(text.c_str(), static_cast<rapidjson::SizeType>(text.size()), a);
  }
  Value* cur = &out->doc;
  auto parts = split_path(key);
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].empty()) throw UsageError("override `" + ov + "` has an empty key component");
    bool last = i + 1 == parts.size();
    // `name[i][j]` indexes into a list the recipe already has (e.g. a pipeline's stages[1].overrides).
    std::string name = parts[i];
    std::vector<size_t> indices;
    if (size_t b = name.find('['); b != std::string::npos) {
      std::string rest = name.substr(b);
      name.resize(b);
      while (!rest.empty()) {
        size_t e = rest.find(']');
        bool digits = rest[0] == '[' && e != std::string::npos && e > 1 &&
                      rest.find_first_not_of("0123456789", 1) == e;
        if (name.empty() || !digits)
          throw UsageError("override `" + ov + "`: `" + parts[i] + "` is not a key or key[index] (e.g. stages[0])");
        indices.push_back(std::stoul(rest.substr(1, e - 1)));
        rest.erase(0, e + 1);
      }
    }
    auto m = cur->FindMember(name.c_str());
    if (m == cur->MemberEnd()) {
      if (!indices.empty())
        throw UsageError("override `" + ov + "`: the recipe has no list " + name + " to index");
      Value k(name.c_str(), a);
      Value v;
      if (last) {
        v.CopyFrom(val, a);
      } else {
        v.SetObject();
      }
      cur->AddMember(k, v, a);
      m = cur->FindMember(name.c_str());
    } else if (last && indices.empty()) {
      m->value.CopyFrom(val, a);
    } else if (indices.empty() && !m->value.IsObject()) {
      throw UsageError("override `" + ov + "`: " + name + " is a " + json::type_name(m->value) +
                       " in the recipe, not a section");
    }
    cur = &m->value;
    std::string at = name;
    for (size_t j = 0; j < indices.size(); ++j) {
      if (!cur->IsArray())
        throw UsageError("override `" + ov + "`: " + at + " is a " + json::type_name(*cur) + " in the recipe, not a list");
      if (indices[j] >= cur->Size())
        throw UsageError("override `" + ov + "`: " + at + " has " + std::to_string(cur->Size()) + " entries (indices 0 to " +
                         std::to_string(static_cast<int64_t>(cur->Size()) - 1) + ")");
      cur = &(*cur)[static_cast<rapidjson::SizeType>(indices[j])];
      at += "[" + std::to_string(indices[j]) + "]";
    }
    if (!indices.empty()) {
      if (last) cur->CopyFrom(val, a);
      else if (!cur->IsObject())
        throw UsageError("override `" + ov + "`: " + at + " is a " + json::type_name(*cur) + " in the recipe, not an object");
    }
  }
  mark_origin(*cur, key, "command line", &out->origin);
}

std::string show(const Value& v) {
  std::string s = json::to_string(v);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

// Binds one section from its JSON object and records every problem.
class ReadVisitor : public Visitor {
 public:
  // `failed` collects the keys that kept their default because the recipe's value was refused.
  ReadVisitor(const Value* obj, std::string prefix, const RecipeJson& json, std::vector<std::string>* errors,
              std::set<std::string>* failed)
      : obj_(obj), prefix_(std::move(prefix)), json_(json), errors_(errors), failed_(failed) {}

  void opt(bool& v, const char* name, bool, const char*) override {
    if (auto* x = find(name)) {
      if (x->IsBool()) v = x->GetBool();
      else bad(name, *x, "a bool (true or false)");
    }
  }
  void opt(int64_t& v, const char* name, int64_t, const char*) override {
    if (auto* x = find(name)) {
      if (x->IsInt64()) v = x->GetInt64();
      else if (x->IsNumber() && std::floor(x->GetDouble()) == x->GetDouble() && std::fabs(x->GetDouble()) < 9e15)
        v = static_cast<int64_t>(x->GetDouble());
      else bad(name, *x, "an integer");
    }
  }
  void opt(double& v, const char* name, double, const char*) override {
    if (auto* x = find(name)) {
      if (x->IsNumber()) v = x->GetDouble();
      else bad(name, *x, "a number");
    }
  }
  void opt(std::string& v, const char* name, const char*, const char*) override {
    if (auto* x = find(name)) {
      if (x->IsString()) v = x->GetString();
      else bad(name, *x, "a string");
    }
  }
  void opt(std::vector<double>& v, const char* name, std::vector<double>, const char*) override {
    if (auto* x = find(name)) {
      bool ok = x->IsArray();
      if (ok)
        for (auto& e : x->GetArray()) ok = ok && e.IsNumber();
      if (!ok) return bad(name, *x, "a list of numbers");
      v.clear();
      for (auto& e : x->GetArray()) v.push_back(e.GetDouble());
    }
  }
  void opt(std::vector<std::string>& v, const char* name, std::vector<std::string>, const char*) override {
    if (auto* x = find(name)) {
      if (x->IsString()) {
        v = {x->GetString()};
        return;
      }
      bool ok = x->IsArray();
      if (ok)
        for (auto& e : x->GetArray()) ok = ok && e.IsString();
      if (!ok) return bad(name, *x, "a string or a list of strings");
      v.clear();
      for (auto& e : x->GetArray()) v.push_back(e.GetString());
    }
  }
  void choice(std::string& v, const char* name, const char*, std::initializer_list<const char*> choices,
              const char*) override {
    if (auto* x = find(name)) {
      std::string all;
      std::vector<std::string> cands;
      for (auto* c : choices) {
        all += (all.empty() ? "" : " | ") + std::string(c);
        cands.emplace_back(c);
      }
      // A choice that lists "true" and "false" (e.g. auto | true | false) takes JSON booleans.
      const bool takes_bools = std::find(cands.begin(), cands.end(), "true") != cands.end() &&
                               std::find(cands.begin(), cands.end(), "false") != cands.end();
      if (x->IsBool() && takes_bools) {
        v = x->GetBool() ? "true" : "false";
        return;
      }
      if (!x->IsString()) return bad(name, *x, "one of " + all);
      std::string s = x->GetString();
      if (std::find(cands.begin(), cands.end(), s) == cands.end()) {
        std::string hint = nearest(s, cands);
        errors_->push_back(where(name) + ": \"" + s + "\" is not one of " + all +
                           (hint.empty() ? "" : " (did you mean \"" + hint + "\"?)"));
        failed_->insert(join_path(prefix_, name));
        return;
      }
      v = s;
    }
  }
  void required(std::string& v, const char* name, const char* help) override {
    if (!find(name)) {
      missing(name, help);
      return;
    }
    opt(v, name, "", help);
  }
  void required(std::vector<DataSource>& v, const char* name, const char* help) override {
    if (!find(name)) {
      missing(name, help);
      return;
    }
    opt(v, name, help);
  }
  void opt(std::vector<DataSource>& v, const char* name, const char*) override {
    const Value* x = find(name);
    if (!x) return;
    const char* expected = "a path, or a list of paths / {\"path\": ..., \"weight\": ...} objects";
    std::vector<DataSource> out;
    auto one = [&](const Value& e) -> bool {
      if (e.IsString()) {
        out.push_back({e.GetString(), 1.0});
        return true;
      }
      if (!e.IsObject()) return false;
      DataSource ds;
      for (auto it = e.MemberBegin(); it != e.MemberEnd(); ++it) {
        std::string k = it->name.GetString();
        if (k == "path" && it->value.IsString()) ds.path = it->value.GetString();
        else if (k == "weight" && it->value.IsNumber() && it->value.GetDouble() > 0) ds.weight = it->value.GetDouble();
        else return false;
      }
      if (ds.path.empty()) return false;
      out.push_back(ds);
      return true;
    };
    bool ok = true;
    if (x->IsArray()) {
      for (auto& e : x->GetArray()) ok = ok && one(e);
    } else {
      ok = one(*x);
    }
    if (!ok) return bad(name, *x, expected);
    v = std::move(out);
  }
  void opt(std::map<std::string, std::string>& v, const char* name, const char*) override {
    const Value* x = find(name);
    if (!x) return;
    bool ok = x->IsObject();
    if (ok)
      for (auto it = x->MemberBegin(); it != x->MemberEnd(); ++it) ok = ok && it->value.IsString();
    if (!ok) return bad(name, *x, "an object of strings, e.g. {\"prompt\": \"question\"}");
    v.clear();
    for (auto it = x->MemberBegin(); it != x->MemberEnd(); ++it) v[it->name.GetString()] = it->value.GetString();
  }

 private:
  const Value* find(const char* name) {
    if (!obj_ || !obj_->IsObject()) return nullptr;
    auto m = obj_->FindMember(name);
    return m == obj_->MemberEnd() ? nullptr : &m->value;
  }
  std::string where(const char* name) const {
    std::string key = join_path(prefix_, name);
    auto o = json_.origin.lower_bound(key);
    std::string from;
    if (o != json_.origin.end() && (o->first == key || o->first.rfind(key + ".", 0) == 0)) from = o->second;
    return (from.empty() ? std::string() : from + ": ") + key;
  }
  void bad(const char* name, const Value& x, const std::string& expected) {
    errors_->push_back(where(name) + ": expected " + expected + ", got " + json::type_name(x) + " " + show(x));
    failed_->insert(join_path(prefix_, name));
  }
  void missing(const char* name, const char* help) {
    std::string from = json_.file.empty() ? "" : json_.file + ": ";
    errors_->push_back(from + "missing required key " + join_path(prefix_, name) + " (" + help + ")");
    failed_->insert(join_path(prefix_, name));
  }

  const Value* obj_;
  std::string prefix_;
  const RecipeJson& json_;
  std::vector<std::string>* errors_;
  std::set<std::string>* failed_;
};

// True when `msg` names `key` ("optim.lr", not "optim.lr_scale" or "xoptim.lr"); a key ending in
// '.' ("optim.") names a whole section and matches any key under it.
bool mentions(const std::string& msg, const std::string& key) {
  auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (size_t at = msg.find(key); at != std::string::npos; at = msg.find(key, at + 1)) {
    if (at > 0 && (word(msg[at - 1]) || msg[at - 1] == '.')) continue;
    const size_t end = at + key.size();
    if (key.back() != '.' && end < msg.size() && word(msg[end])) continue;
    return true;
  }
  return false;
}

// Collects declared keys of a section.
class KeyVisitor : public Visitor {
 public:
  explicit KeyVisitor(std::string prefix) : prefix_(std::move(prefix)) {}
  std::vector<std::string> keys;
  void opt(bool&, const char* n, bool, const char*) override { add(n); }
  void opt(int64_t&, const char* n, int64_t, const char*) override { add(n); }
  void opt(double&, const char* n, double, const char*) override { add(n); }
  void opt(std::string&, const char* n, const char*, const char*) override { add(n); }
  void opt(std::vector<double>&, const char* n, std::vector<double>, const char*) override { add(n); }
  void opt(std::vector<std::string>&, const char* n, std::vector<std::string>, const char*) override { add(n); }
  void choice(std::string&, const char* n, const char*, std::initializer_list<const char*>, const char*) override {
    add(n);
  }
  void required(std::string&, const char* n, const char*) override { add(n); }
  void required(std::vector<DataSource>&, const char* n, const char*) override { add(n); }
  void opt(std::vector<DataSource>&, const char* n, const char*) override { add(n); }
  void opt(std::map<std::string, std::string>&, const char* n, const char*) override { add(n); }

 private:
  void add(const char* n) { keys.push_back(join_path(prefix_, n)); }
  std::string prefix_;
};

// Writes current values as JSON.
class WriteVisitor : public Visitor {
 public:
  WriteVisitor(Value* obj, Alloc& a) : obj_(obj), a_(a) {}
  void opt(bool& v, const char* n, bool, const char*) override { put(n, Value(v)); }
  void opt(int64_t& v, const char* n, int64_t, const char*) override { put(n, Value(static_cast<int64_t>(v))); }
  void opt(double& v, const char* n, double, const char*) override { put(n, Value(v)); }
  void opt(std::string& v, const char* n, const char*, const char*) override { put(n, str(v)); }
  void opt(std::vector<double>& v, const char* n, std::vector<double>, const char*) override {
    Value arr(rapidjson::kArrayType);
    for (double d : v) arr.PushBack(Value(d), a_);
    put(n, std::move(arr));
  }
  void opt(std::vector<std::string>& v, const char* n, std::vector<std::string>, const char*) override {
    Value arr(rapidjson::kArrayType);
    for (auto& s : v) arr.PushBack(str(s), a_);
    put(n, std::move(arr));
  }
  void choice(std::string& v, const char* n, const char*, std::initializer_list<const char*> c, const char*) override {
    // auto | true | false: the booleans are written as JSON booleans (what a bool key wrote before).
    bool bools = false;
    for (const char* x : c) bools = bools || std::string(x) == "true";
    if (bools && (v == "true" || v == "false")) put(n, Value(v == "true"));
    else put(n, str(v));
  }
  void required(std::string& v, const char* n, const char*) override { put(n, str(v)); }
  void required(std::vector<DataSource>& v, const char* n, const char* h) override { opt(v, n, h); }
  void opt(std::vector<DataSource>& v, const char* n, const char*) override {
    Value arr(rapidjson::kArrayType);
    for (auto& d : v) {
      Value o(rapidjson::kObjectType);
      o.AddMember("path", str(d.path), a_);
      o.AddMember("weight", Value(d.weight), a_);
      arr.PushBack(o, a_);
    }
    put(n, std::move(arr));
  }
  void opt(std::map<std::string, std::string>& v, const char* n, const char*) override {
    Value o(rapidjson::kObjectType);
    for (const auto& [k, x] : v) o.AddMember(str(k), str(x), a_);
    put(n, std::move(o));
  }

 private:
  Value str(const std::string& s) { return Value(s.c_str(), static_cast<rapidjson::SizeType>(s.size()), a_); }
  void put(const char* n, Value v) { obj_->AddMember(Value(n, a_), v, a_); }
  Value* obj_;
  Alloc& a_;
};

// One help line per option.
class HelpVisitor : public Visitor {
 public:
  HelpVisitor(std::ostream& os, std::string prefix) : os_(os), prefix_(std::move(prefix)) {}
  void opt(bool&, const char* n, bool d, const char* h) override { line(n, "bool", d ? "true" : "false", h); }
  void opt(int64_t&, const char* n, int64_t d, const char* h) override { line(n, "int", std::to_string(d), h); }
  void opt(double&, const char* n, double d, const char* h) override {
    std::ostringstream s;
    s << d;
    line(n, "float", s.str(), h);
  }
  void opt(std::string&, const char* n, const char* d, const char* h) override {
    line(n, "string", std::string("\"") + d + "\"", h);
  }
  void opt(std::vector<double>&, const char* n, std::vector<double> d, const char* h) override {
    std::ostringstream s;
    s << "[";
    for (size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
    s << "]";
    line(n, "floats", s.str(), h);
  }
  void opt(std::vector<std::string>&, const char* n, std::vector<std::string> d, const char* h) override {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", \"" : "\"") + d[i] + "\"";
    line(n, "strings", s + "]", h);
  }
  void choice(std::string&, const char* n, const char* d, std::initializer_list<const char*> c,
              const char* h) override {
    std::string all;
    for (auto* x : c) all += (all.empty() ? "" : "|") + std::string(x);
    line(n, all, std::string("\"") + d + "\"", h);
  }
  void required(std::string&, const char* n, const char* h) override { line(n, "string", "required", h); }
  void required(std::vector<DataSource>&, const char* n, const char* h) override { line(n, "sources", "required", h); }
  void opt(std::vector<DataSource>&, const char* n, const char* h) override { line(n, "sources", "[]", h); }
  void opt(std::map<std::string, std::string>&, const char* n, const char* h) override { line(n, "object", "{}", h); }

 private:
  void line(const char* n, const std::string& type, const std::string& def, const char* help) {
    std::string key = join_path(prefix_, n);
    os_ << "  " << key;
    size_t w = key.size() + 2;
    os_ << std::string(w < 30 ? 30 - w : 1, ' ') << "(" << type << ", default " << def << ")\n";
    os_ << "      " << help << "\n";
  }
  std::ostream& os_;
  std::string prefix_;
};

const Value* find_section(const Value& root, const std::string& name) {
  if (name.empty()) return &root;
  const Value* cur = &root;
  for (auto& p : split_path(name)) {
    if (!cur->IsObject()) return nullptr;
    auto m = cur->FindMember(p.c_str());
    if (m == cur->MemberEnd()) return nullptr;
    cur = &m->value;
  }
  return cur;
}

// TRL's (transformers' TrainingArguments, SFT/DPO/GRPOConfig) names of options ptk has under another
// key: the first candidate the command declares is suggested, with `note` when the value differs
// in kind. Matched on an unknown key's last component, at the top level or inside any section.
struct TrlName {
  const char* trl;
  const char* ptk[3];  // candidates, nullptr-terminated when fewer
  const char* note;
};
const TrlName kTrlNames[] = {
    {"learning_rate", {"optim.lr"}, ""},
    {"gradient_accumulation_steps", {"train.grad_accum"}, ""},
    {"lr_scheduler_type", {"optim.schedule"}, "constant | linear | cosine"},
    {"per_device_train_batch_size", {"train.micro_batch_size"}, "rows per forward; the step has micro_batch_size x grad_accum x ranks"},
    {"train_batch_size", {"train.micro_batch_size"}, ""},
    {"per_device_eval_batch_size", {"sft.eval_micro_batch_size", "dpo.eval_micro_batch_size", "rm.eval_micro_batch_size"}, ""},
    {"num_train_epochs", {"train.epochs"}, "a whole number"},
    {"max_steps", {"train.max_steps"}, ""},
    {"warmup_ratio", {"optim.warmup_steps"}, "a step count, not a ratio: warmup_ratio x the run's optimizer steps"},
    {"warmup_steps", {"optim.warmup_steps"}, ""},
    {"weight_decay", {"optim.weight_decay"}, ""},
    {"max_grad_norm", {"optim.clip_grad_norm"}, ""},
    {"adam_beta1", {"optim.betas"}, "a list [beta1, beta2]"},
    {"adam_beta2", {"optim.betas"}, "a list [beta1, beta2]"},
    {"adam_epsilon", {"optim.eps"}, ""},
    {"min_lr", {"optim.min_lr"}, ""},
    {"beta", {"dpo.beta", "grpo.beta"}, ""},
    {"max_length", {"data.max_seq_len"}, ""},
    {"max_seq_length", {"data.max_seq_len"}, ""},
    {"packing", {"data.packing"}, ""},
    {"output_dir", {"run.dir"}, ""},
    {"logging_steps", {"train.log_every"}, ""},
    {"save_steps", {"checkpoint.every"}, ""},
    {"save_total_limit", {"checkpoint.keep_last"}, ""},
    {"eval_steps", {"train.eval_every"}, ""},
    {"seed", {"run.seed"}, ""},
    {"bf16", {"model.dtype"}, "model.dtype=\"bfloat16\" (true) or \"float32\""},
    {"torch_dtype", {"model.dtype"}, "auto | float32 | bfloat16"},
    {"dtype", {"model.dtype"}, "auto | float32 | bfloat16"},
    {"gradient_checkpointing", {"model.activation_checkpointing"}, ""},
    {"model_name_or_path", {"model.path"}, "a local Hugging Face folder"},
    {"num_generations", {"grpo.num_generations"}, ""},
    {"max_completion_length", {"grpo.max_completion_length"}, ""},
    {"loss_type", {"dpo.loss_type", "grpo.loss_type"}, ""},
    {"precompute_ref_log_probs", {"dpo.precompute_ref_log_probs"}, ""},
    {"resume_from_checkpoint", {"resume"}, "auto | never | a checkpoint folder"},
    // TRL's ModelConfig / PEFT's LoraConfig
    {"use_peft", {"model.lora.enabled"}, ""},
    {"lora_r", {"model.lora.rank"}, ""},
    {"r", {"model.lora.rank"}, ""},
    {"lora_alpha", {"model.lora.alpha"}, ""},
    {"lora_dropout", {"model.lora.dropout"}, ""},
    {"lora_target_modules", {"model.lora.targets"}, "a list of q_proj ... down_proj, or [\"all-linear\"]"},
    {"target_modules", {"model.lora.targets"}, "a list of q_proj ... down_proj, or [\"all-linear\"]"},
    {"use_rslora", {"model.lora.rslora"}, ""},
    {"lora_modules_to_save", {"model.lora.modules_to_save"}, ""},
    {"modules_to_save", {"model.lora.modules_to_save"}, ""},
    {"init_lora_weights", {"model.lora.init"}, "default | gaussian"},
};

// "did you mean optim.lr? (TRL's learning_rate)" for an unknown key whose last component is a TRL
// name of a key this command declares; "" otherwise.
std::string trl_hint(const std::string& leaf, const std::set<std::string>& keys) {
  for (const TrlName& t : kTrlNames) {
    if (leaf != t.trl) continue;
    for (const char* k : t.ptk) {
      if (!k || !keys.count(k)) continue;
      return std::string(" (did you mean ") + k + "? TRL's " + t.trl + " is ptk's " + k +
             (*t.note ? std::string(": ") + t.note : std::string()) + ")";
    }
  }
  return "";
}

// Reports keys in the JSON that no section declares.
void check_unknown(const Value& v, const std::string& path, const std::set<std::string>& keys,
                   const std::set<std::string>& sections, const std::vector<std::string>& key_list,
                   const RecipeJson& json, std::vector<std::string>* errors, std::set<std::string>* failed) {
  for (auto it = v.MemberBegin(); it != v.MemberEnd(); ++it) {
    std::string p = join_path(path, it->name.GetString());
    if (keys.count(p)) continue;
    if (sections.count(p)) {
      if (it->value.IsObject()) {
        check_unknown(it->value, p, keys, sections, key_list, json, errors, failed);
      } else {
        auto o = json.origin.find(p);
        errors->push_back((o != json.origin.end() ? o->second + ": " : std::string()) + p +
                          ": expected a section (object), got " + json::type_name(it->value));
        failed->insert(p + ".");  // every key of the section kept its default
      }
      continue;
    }
    // Unknown: name the file that set it and the nearest valid key.
    auto o = json.origin.lower_bound(p);
    std::string from;
    if (o != json.origin.end() && (o->first == p || o->first.rfind(p + ".", 0) == 0)) from = o->second;
    if (std::string trl = trl_hint(it->name.GetString(), keys); !trl.empty()) {
      errors->push_back((from.empty() ? "" : from + ": ") + "unknown key " + p + trl);
      continue;
    }
    std::vector<std::string> cands(key_list.begin(), key_list.end());
    for (auto& s : sections)
      if (!s.empty()) cands.push_back(s);
    std::string hint = nearest(p, cands);
    if (hint.empty()) {
      // Try the last component against keys of the same section.
      std::string leaf = it->name.GetString();
      for (auto& k : key_list) {
        auto dot = k.rfind('.');
        std::string kl = dot == std::string::npos ? k : k.substr(dot + 1);
        if (edit_distance(leaf, kl) <= std::max<size_t>(1, leaf.size() / 4)) {
          hint = k;
          break;
        }
      }
    }
    errors->push_back((from.empty() ? "" : from + ": ") + "unknown key " + p +
                      (hint.empty() ? "" : " (did you mean " + hint + "?)"));
  }
}

}  // namespace

RecipeJson load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  RecipeJson out;
  out.file = path;
  if (!path.empty()) {
    if (!path_exists(path)) throw Error("recipe " + path + " does not exist");
    std::vector<std::string> stack, duplicates;
    load_chain(path, &out, &stack, &duplicates);
    if (!duplicates.empty()) {
      std::string msg = std::to_string(duplicates.size()) + " duplicate key" + (duplicates.size() == 1 ? "" : "s") +
                        " in recipe " + path + ":";
      for (auto& d : duplicates) msg += "\n  - " + d;
      msg += "\n---> HINT: JSON keeps only one value of a repeated key; delete all but the one you mean "
             "(a key set again in a `base` file or on the command line is fine: that is layering).";
      throw Error(msg);
    }
  }
  for (auto& ov : overrides) apply_override(ov, &out);
  return out;
}

void bind_recipe(const RecipeJson& json, const std::vector<Section*>& sections,
                 const std::function<void(Errors&)>& extra_checks) {
  std::vector<std::string> errors;
  std::set<std::string> keys, section_names;
  std::vector<std::string> key_list;
  for (Section* s : sections) {
    set_defaults(*s);
    section_names.insert(s->name());
    // Parent sections of dotted ones ("grpo" for "grpo.reward") are sections too.
    std::string n = s->name();
    for (auto dot = n.rfind('.'); dot != std::string::npos; dot = n.rfind('.')) {
      n = n.substr(0, dot);
      section_names.insert(n);
    }
    KeyVisitor kv(s->name());
    s->visit(kv);
    for (auto& k : kv.keys) {
      keys.insert(k);
      key_list.push_back(k);
    }
  }
  std::set<std::string> failed;  // keys whose recipe value was refused (they hold their default)
  for (Section* s : sections) {
    const Value* obj = find_section(json.doc, s->name());
    if (obj && !obj->IsObject()) continue;  // reported by check_unknown
    ReadVisitor rv(obj, s->name(), json, &errors, &failed);
    s->visit(rv);
  }
  check_unknown(json.doc, "", keys, section_names, key_list, json, &errors, &failed);
  // Range and cross-field checks run even when keys were unknown or mistyped, so every error comes
  // at once; only a check that names a refused key is left out (it would judge the default, not
  // what the recipe said).
  Errors cross;
  for (Section* s : sections) s->validate(cross);
  if (extra_checks) extra_checks(cross);
  for (auto& e : cross.items) {
    bool about_refused = false;
    for (auto& k : failed) about_refused = about_refused || mentions(e, k);
    if (!about_refused) errors.push_back((json.file.empty() ? "" : json.file + ": ") + e);
  }
  if (!errors.empty()) {
    std::string msg = std::to_string(errors.size()) + (errors.size() == 1 ? " error" : " errors") + " in recipe" +
                      (json.file.empty() ? "" : " " + json.file) + ":";
    for (auto& e : errors) msg += "\n  - " + e;
    msg += "\n---> HINT: `ptk <command> --help` lists every key with its type and default.";
    throw Error(msg);
  }
}

std::string resolved_json(const std::vector<Section*>& sections) {
  rapidjson::Document doc;
  doc.SetObject();
  auto& a = doc.GetAllocator();
  for (Section* s : sections) {
    Value* obj = &doc;
    std::string n = s->name();
    if (!n.empty()) {
      for (auto& p : split_path(n)) {
        auto m = obj->FindMember(p.c_str());
        if (m == obj->MemberEnd()) {
          obj->AddMember(Value(p.c_str(), a), Value(rapidjson::kObjectType), a);
          m = obj->FindMember(p.c_str());
        }
        obj = &m->value;
      }
    }
    WriteVisitor wv(obj, a);
    s->visit(wv);
  }
  return json::to_string(doc, true) + "\n";
}

void print_help(std::ostream& os, const std::vector<Section*>& sections) {
  for (Section* s : sections) {
    os << "\n[" << (*s->name() ? s->name() : "top level") << "] " << s->help() << "\n";
    HelpVisitor hv(os, s->name());
    s->visit(hv);
  }
}

std::vector<std::string> all_keys(const std::vector<Section*>& sections) {
  std::vector<std::string> out;
  for (Section* s : sections) {
    KeyVisitor kv(s->name());
    s->visit(kv);
    out.insert(out.end(), kv.keys.begin(), kv.keys.end());
  }
  return out;
}

}  // namespace ptk::config
