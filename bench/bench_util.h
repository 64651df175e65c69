// What every benchmark in bench/ needs besides its own work: wall-clock seconds, the load average to
// print beside each figure (the machine is shared), and the source tree to find assets and recipes.
#pragma once
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>

namespace ptk::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// "1-min 5-min 15-min" from /proc/loadavg.
inline std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

#ifdef PTK_SOURCE_DIR_DEFAULT
// $PTK_SOURCE_DIR, else the source tree this benchmark was built from.
inline std::string source_dir() {
  const char* env = std::getenv("PTK_SOURCE_DIR");
  return env ? env : PTK_SOURCE_DIR_DEFAULT;
}
#endif

}  // namespace ptk::bench
