// Errors that say what went wrong, where, and how to fix it. The one exception type ptk throws.
// Not a logging facility (see core/runtime/log.h).
#pragma once
#include <stdexcept>
#include <string>

namespace ptk {

// Thrown for every user-facing failure (bad recipe, bad data, bad checkpoint). `what()` is the
// full message, ready to print; apps catch it at the top and exit with status 1.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Usage errors (bad flags): apps exit with status 2.
class UsageError : public Error {
 public:
  using Error::Error;
};

namespace detail {
[[noreturn]] void fail_check(const char* file, int line, const char* cond, const std::string& msg);
}  // namespace detail

}  // namespace ptk

// PTK_CHECK(cond, msg): throws ptk::Error "msg (check `cond` failed at file:line)".
#define PTK_CHECK(cond, msg)                                               \
  do {                                                                     \
    if (!(cond)) ::ptk::detail::fail_check(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
