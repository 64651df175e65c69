// One declaration per recipe option — name, default, help — visited by every consumer: defaults,
// JSON binding with typed validation, --help, and the resolved recipe written to the run folder
// (gemma.cpp's visitor pattern). Not the file loader: see recipe.h.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

namespace ptk::config {

// One entry of `data.train` / `data.eval`: a file or glob with a mixing weight.
struct DataSource {
  std::string path;
  double weight = 1.0;
};

// What a section struct's visit() calls, once per option. `name` is the key inside the section.
class Visitor {
 public:
  virtual ~Visitor() = default;
  virtual void opt(bool& v, const char* name, bool def, const char* help) = 0;
  virtual void opt(int64_t& v, const char* name, int64_t def, const char* help) = 0;
  virtual void opt(double& v, const char* name, double def, const char* help) = 0;
  virtual void opt(std::string& v, const char* name, const char* def, const char* help) = 0;
  virtual void opt(std::vector<double>& v, const char* name, std::vector<double> def, const char* help) = 0;
  virtual void opt(std::vector<std::string>& v, const char* name, std::vector<std::string> def,
                   const char* help) = 0;
  // A string restricted to a closed set (torchtune: no arbitrary dotted names).
  virtual void choice(std::string& v, const char* name, const char* def,
                      std::initializer_list<const char*> choices, const char* help) = 0;
  // Required: no default; absent is an error naming the key.
  virtual void required(std::string& v, const char* name, const char* help) = 0;
  virtual void required(std::vector<DataSource>& v, const char* name, const char* help) = 0;
  // Optional list of data sources (empty by default).
  virtual void opt(std::vector<DataSource>& v, const char* name, const char* help) = 0;
  // Optional string -> string object (empty by default), e.g. data.columns. Visitors that do not
  // handle it ignore it.
  virtual void opt(std::map<std::string, std::string>& v, const char* name, const char* help) {}
};

// Cross-field checks collect messages here; each names the keys and quotes the offending values.
struct Errors {
  std::vector<std::string> items;
  void add(std::string msg) { items.push_back(std::move(msg)); }
};

// A recipe section: `optim`, `data`, `sft`... The root section ("") holds top-level keys such as
// `resume`. Section structs are plain data plus visit(); defaults live only in visit().
class Section {
 public:
  virtual ~Section() = default;
  virtual const char* name() const = 0;  // dotted path of the section, "" for the root
  virtual const char* help() const = 0;  // one line
  virtual void visit(Visitor& v) = 0;
  virtual void validate(Errors& e) const {}
};

// Sets every option of `s` to its declared default.
void set_defaults(Section& s);

}  // namespace ptk::config
