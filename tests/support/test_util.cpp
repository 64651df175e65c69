#include "tests/support/test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace ptk::test {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/ptk-test-XXXXXX";
  if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string TempDir::write(const std::string& name, const std::string& content) const {
  std::string p = file(name);
  std::filesystem::create_directories(std::filesystem::path(p).parent_path());
  std::ofstream(p, std::ios::binary) << content;
  return p;
}

static std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

std::string source_dir() { return env_or("PTK_SOURCE_DIR", "."); }
std::string ptk_binary() { return env_or("PTK_BINARY", "ptk"); }

std::string shared_dir() {
  std::string d = env_or("PTK_SHARED_DIR", "");
  if (d.empty()) d = source_dir() + "/../shared";
  return std::filesystem::exists(d + "/DESIGN.md") ? std::filesystem::canonical(d).string() : "";
}

std::string reference_python() {
  std::string py = source_dir() + "/.venv/bin/python3";
  return std::filesystem::exists(py) ? py : "";
}

std::string qwen_tokenizer_json() {
  std::string assets = source_dir() + "/assets/tokenizers/qwen/tokenizer.json";
  if (std::filesystem::exists(assets)) return assets;
  std::string shared = shared_dir();
  if (!shared.empty() && std::filesystem::exists(shared + "/tokenizers/qwen/tokenizer.json"))
    return shared + "/tokenizers/qwen/tokenizer.json";
  return "";
}

RunResult run(const std::string& command) {
  std::string cmd = command + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) throw std::runtime_error("popen failed: " + command);
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int status = pclose(p);
  int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return {code, out};
}

}  // namespace ptk::test
