#include "tests/support/test_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <future>
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

bool required(const char* resource) {
  const std::string list = "," + env_or("PTK_REQUIRE", "") + ",";
  return list.find("," + std::string(resource) + ",") != std::string::npos;
}

std::string skip_label(const char* resource) {
  if (!required(resource)) return std::string("[") + resource + "]";
  return std::string("PTK_REQUIRE lists \"") + resource + "\", so this test may not skip for want of it:";
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

std::string make_fifo(const std::string& path) {
  if (::mkfifo(path.c_str(), 0644) != 0) throw std::runtime_error("mkfifo " + path + ": " + std::strerror(errno));
  return path;
}

std::string error_within(const std::function<void()>& fn, const std::string& fifo, double seconds) {
  auto fut = std::async(std::launch::async, [fn]() -> std::string {
    try {
      fn();
    } catch (const std::exception& e) {
      return e.what();
    }
    return "";
  });
  if (fut.wait_for(std::chrono::duration<double>(seconds)) == std::future_status::ready) return fut.get();
  // Still running: most likely blocked in open() on the FIFO. A writer that opens and closes it
  // releases that open (and a read after it sees the end), so the thread can be joined; repeated
  // in case the reader reaches a blocking open() again.
  do {
    int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) ::close(fd);
  } while (fut.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready);
  char waited[32];
  std::snprintf(waited, sizeof waited, "%g", seconds);
  return std::string("HUNG: still running after ") + waited + " s (then: " + fut.get() + ")";
}

}  // namespace ptk::test

