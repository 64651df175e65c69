// What this CPU can run, checked once per process: the AVX-512 kernels (packed decode linears,
// per-row decode attention, the lm_head op's row passes) are used only where it says yes.
#pragma once

namespace ptk::kernels::cpu {

inline bool cpu_has_avx512f() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

}  // namespace ptk::kernels::cpu
