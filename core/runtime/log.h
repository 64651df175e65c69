// Minimal logging to stderr with elapsed time. Not structured metrics (see core/train/metrics.h).
#pragma once
#include <string>

namespace ptk::log {
void info(const std::string& msg);
void warn(const std::string& msg);
}  // namespace ptk::log
