#include "core/util/error.h"

#include <cstring>

namespace ptk::detail {

void fail_check(const char* file, int line, const char* cond, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  std::string where = base ? base + 1 : file;
  throw Error(msg + " (check `" + cond + "` failed at " + where + ":" + std::to_string(line) + ")");
}

}  // namespace ptk::detail
