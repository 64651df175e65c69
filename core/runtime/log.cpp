#include "core/runtime/log.h"

#include <chrono>
#include <cstdio>

namespace ptk::log {
namespace {
double elapsed() {
  static const auto t0 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void info(const std::string& msg) { std::fprintf(stderr, "[%8.1fs] %s\n", elapsed(), msg.c_str()); }
void warn(const std::string& msg) { std::fprintf(stderr, "[%8.1fs] WARNING: %s\n", elapsed(), msg.c_str()); }
}  // namespace ptk::log
