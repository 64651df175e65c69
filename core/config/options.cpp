#include "core/config/options.h"

namespace ptk::config {
namespace {

class DefaultsVisitor : public Visitor {
 public:
  void opt(bool& v, const char*, bool def, const char*) override { v = def; }
  void opt(int64_t& v, const char*, int64_t def, const char*) override { v = def; }
  void opt(double& v, const char*, double def, const char*) override { v = def; }
  void opt(std::string& v, const char*, const char* def, const char*) override { v = def; }
  void opt(std::vector<double>& v, const char*, std::vector<double> def, const char*) override { v = def; }
  void opt(std::vector<std::string>& v, const char*, std::vector<std::string> def, const char*) override {
    v = def;
  }
  void choice(std::string& v, const char*, const char* def, std::initializer_list<const char*>,
              const char*) override {
    v = def;
  }
  void required(std::string& v, const char*, const char*) override { v.clear(); }
  void required(std::vector<DataSource>& v, const char*, const char*) override { v.clear(); }
  void opt(std::vector<DataSource>& v, const char*, const char*) override { v.clear(); }
  void opt(std::map<std::string, std::string>& v, const char*, const char*) override { v.clear(); }
};

}  // namespace

void set_defaults(Section& s) {
  DefaultsVisitor d;
  s.visit(d);
}

}  // namespace ptk::config
