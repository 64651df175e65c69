#include "core/runtime/cpu_allocator.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ptk::runtime {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kSmallAlignment = 64;  // what LibTorch's default CPU allocator aligns to

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// 80% of physical memory (or of the cgroup's limit where that is lower), split among the ranks that
// share this machine (LOCAL_WORLD_SIZE, which `ptk launch` and torchrun set).
size_t default_limit() {
  size_t bytes = 0;
#ifdef __linux__
  bytes = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::ifstream cg("/sys/fs/cgroup/memory.max");
  std::string v;
  if (cg >> v && v != "max") {
    char* end = nullptr;
    unsigned long long c = std::strtoull(v.c_str(), &end, 10);
    if (end && *end == '\0' && c > 0) bytes = std::min<size_t>(bytes, c);
  }
#endif
  long ranks = 1;
  if (const char* env = std::getenv("LOCAL_WORLD_SIZE")) ranks = std::max(1L, std::strtol(env, nullptr, 10));
  return bytes / 5 * 4 / static_cast<size_t>(ranks);
}

struct State {
  std::mutex mu;
  CpuAllocatorOptions opt;
  bool installed = false;
  std::unordered_map<void*, size_t> in_use;           // large block -> its mapped bytes
  std::map<std::pair<size_t, uint64_t>, void*> by_size;  // cached: (bytes, free order) -> block
  std::map<uint64_t, std::pair<size_t, void*>> by_age;   // cached: free order -> (bytes, block)
  uint64_t next_order = 0;
  CpuAllocatorStats stats;

  size_t mapped() const { return stats.in_use_bytes + stats.cached_bytes; }
};

// Never destroyed: tensors can be freed during static destruction.
State& state() {
  static State* s = new State;
  return *s;
}

#ifdef __linux__
void unmap(void* p, size_t bytes) { munmap(p, bytes); }

// A 2 MiB-aligned anonymous mapping of `bytes` (a multiple of 2 MiB), or nullptr.
void* map_aligned(size_t bytes, bool huge) {
  const size_t len = bytes + kHugePage;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<uintptr_t>(raw), aligned = round_up(start, kHugePage);
  const size_t head = aligned - start, tail = len - head - bytes;
  if (head) munmap(raw, head);
  if (tail) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  void* p = reinterpret_cast<void*>(aligned);
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the block still works
  return p;
}
#else
// Never reached: install_cpu_allocator refuses to install off Linux.
void unmap(void*, size_t) {}
void* map_aligned(size_t, bool) { return nullptr; }
#endif

// Unmaps the least recently freed cached block; false when the cache is empty. Caller holds mu.
bool unmap_oldest(State& s) {
  if (s.by_age.empty()) return false;
  auto it = s.by_age.begin();
  const auto [bytes, p] = it->second;
  s.by_size.erase({bytes, it->first});
  s.by_age.erase(it);
  s.stats.cached_bytes -= bytes;
  ++s.stats.unmapped;
  unmap(p, bytes);
  return true;
}

void* take_large(size_t n) {
  State& s = state();
  const size_t need = round_up(n, kHugePage);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.by_size.lower_bound({need, 0});
  if (it != s.by_size.end()) {
    auto [bytes, order] = it->first;
    void* p = it->second;
    s.by_size.erase(it);
    s.by_age.erase(order);
    s.stats.cached_bytes -= bytes;
    // A block much larger than the request gives its tail back rather than hold it idle.
    if (bytes > need + need / 4) {
      unmap(static_cast<char*>(p) + need, bytes - need);
      bytes = need;
    }
    s.in_use[p] = bytes;
    s.stats.in_use_bytes += bytes;
    ++s.stats.hits;
    return p;
  }
  while (s.mapped() + need > s.opt.limit_bytes && unmap_oldest(s)) {
  }
  void* p = map_aligned(need, s.opt.huge_pages);
  if (!p) {
    while (unmap_oldest(s)) {
    }
    p = map_aligned(need, s.opt.huge_pages);
  }
  TORCH_CHECK(p, "ptk CPU allocator: cannot map ", need, " bytes (", s.stats.in_use_bytes,
              " bytes of large tensors in use): out of memory");
  s.in_use[p] = need;
  s.stats.in_use_bytes += need;
  ++s.stats.misses;
  return p;
}

void free_small(void* p) { std::free(p); }

// Returns true when p was a large block (now cached or unmapped).
bool give_back_large(void* p) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.in_use.find(p);
  if (it == s.in_use.end()) return false;
  const size_t bytes = it->second;
  s.in_use.erase(it);
  s.stats.in_use_bytes -= bytes;
  if (s.opt.keep_freed) {
    const uint64_t order = s.next_order++;
    s.by_size.emplace(std::make_pair(bytes, order), p);
    s.by_age.emplace(order, std::make_pair(bytes, p));
    s.stats.cached_bytes += bytes;
  } else {
    unmap(p, bytes);
  }
  return true;
}

void free_large(void* p) {
  if (p) give_back_large(p);
}

void free_any(void* p) {
  if (p && !give_back_large(p)) std::free(p);
}

class CpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &free_small, cpu};
    if (n >= state().opt.min_bytes) {
      void* p = take_large(n);
      return {p, p, &free_large, cpu};
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kSmallAlignment, n) == 0 && p, "ptk CPU allocator: out of memory allocating ",
                n, " bytes");
    return {p, p, &free_small, cpu};
  }
  // For raw_allocate/raw_deallocate: one deleter for both kinds.
  c10::DeleterFnPtr raw_deleter() const override { return &free_any; }
  // Tensor clones of memory this allocator owns: a plain copy.
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

bool install_cpu_allocator(const CpuAllocatorOptions& options) {
  State& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.installed) return true;
#ifndef __linux__
    return false;
#endif
    s.opt = options;
    s.opt.min_bytes = std::max(options.min_bytes, kHugePage);
    if (s.opt.limit_bytes == 0) s.opt.limit_bytes = default_limit();
    s.installed = true;
  }
  static CpuAllocator allocator;
  c10::SetCPUAllocator(&allocator, /*priority=*/1);
  return true;
}

bool cpu_allocator_installed() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.installed;
}

void release_cached_cpu_blocks() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  while (unmap_oldest(s)) {
  }
}

CpuAllocatorStats cpu_allocator_stats() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.stats;
}

}  // namespace ptk::runtime
