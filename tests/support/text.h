// Small text helpers for tests that read a command's output. Test code only.
#pragma once
#include <cstddef>
#include <string>

namespace ptk::test {

// How many times `what` occurs in `s` (overlapping occurrences count).
inline size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

}  // namespace ptk::test
