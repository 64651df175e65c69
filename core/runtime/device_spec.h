// The spellings of a device in recipes and flags (run.device, --device), torch-free so recipe
// validation can check them without LibTorch. Resolving one: core/runtime/device.h.
#pragma once
#include <string>

namespace ptk::runtime {

// auto | cpu | cuda | cuda:N | meta. `meta` places tensors without storage (shapes only): for tests
// that any tensor made on the CPU while the model is elsewhere fails; nothing is computed.
inline bool valid_device_spec(const std::string& spec) {
  if (spec == "auto" || spec == "cpu" || spec == "cuda" || spec == "meta") return true;
  if (spec.size() <= 5 || spec.compare(0, 5, "cuda:") != 0 || spec.size() > 9) return false;
  for (size_t i = 5; i < spec.size(); ++i)
    if (spec[i] < '0' || spec[i] > '9') return false;
  return true;
}

}  // namespace ptk::runtime
