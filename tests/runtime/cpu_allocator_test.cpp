// The CPU allocator runtime::init installs: large tensors in their own 2 MiB-aligned mappings on
// transparent huge pages, kept on free and reused (smallest cached block that fits; a much larger
// one gives its tail back), unmapped oldest-first past the limit; small ones from malloc.
// One install per process, so every test here shares the options set in the first.
#include <gtest/gtest.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/runtime/cpu_allocator.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

void install() {
  runtime::CpuAllocatorOptions o;
  o.limit_bytes = 96 * kMiB;
  ASSERT_TRUE(runtime::install_cpu_allocator(o));
  ASSERT_TRUE(runtime::cpu_allocator_installed());
}

at::Tensor floats_of(size_t bytes) { return torch::empty({static_cast<int64_t>(bytes / sizeof(float))}); }

uintptr_t addr(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

TEST(CpuAllocator, LargeTensorsAreAlignedKeptAndReused) {
  install();
  runtime::release_cached_cpu_blocks();
  const auto before = runtime::cpu_allocator_stats();
  uintptr_t first = 0;
  {
    auto t = floats_of(10 * kMiB);
    first = addr(t);
    EXPECT_EQ(first % (2 * kMiB), 0u);
    EXPECT_EQ(runtime::cpu_allocator_stats().in_use_bytes, before.in_use_bytes + 10 * kMiB);
    t.fill_(3.0f);
    EXPECT_DOUBLE_EQ(t.sum().item<double>(), 3.0 * t.numel());
  }
  auto freed = runtime::cpu_allocator_stats();
  EXPECT_EQ(freed.in_use_bytes, before.in_use_bytes);
  EXPECT_EQ(freed.cached_bytes, 10 * kMiB);
  auto again = floats_of(9 * kMiB + 7);  // rounds up to the same 10 MiB
  EXPECT_EQ(addr(again), first);
  auto after = runtime::cpu_allocator_stats();
  EXPECT_EQ(after.hits, freed.hits + 1);
  EXPECT_EQ(after.cached_bytes, 0u);
}

TEST(CpuAllocator, MuchLargerCachedBlockGivesItsTailBack) {
  install();
  runtime::release_cached_cpu_blocks();
  uintptr_t big = 0;
  { big = addr(floats_of(64 * kMiB)); }
  EXPECT_EQ(runtime::cpu_allocator_stats().cached_bytes, 64 * kMiB);
  auto small = floats_of(16 * kMiB);
  EXPECT_EQ(addr(small), big);
  auto s = runtime::cpu_allocator_stats();
  EXPECT_EQ(s.cached_bytes, 0u);  // the other 48 MiB went back to the kernel
  small.fill_(1.0f);
  EXPECT_DOUBLE_EQ(small.sum().item<double>(), static_cast<double>(small.numel()));
}

TEST(CpuAllocator, UnmapsOldestCachedBlocksPastTheLimit) {
  install();  // limit 96 MiB
  runtime::release_cached_cpu_blocks();
  const auto before = runtime::cpu_allocator_stats();
  auto a = floats_of(40 * kMiB), b = floats_of(20 * kMiB);
  a.reset();  // freed first: the oldest
  b.reset();
  EXPECT_EQ(runtime::cpu_allocator_stats().cached_bytes, 60 * kMiB);
  auto c = floats_of(48 * kMiB);  // nothing fits; 60 + 48 > 96: the oldest cached (40 MiB) goes
  auto s = runtime::cpu_allocator_stats();
  EXPECT_EQ(s.misses, before.misses + 3);
  EXPECT_EQ(s.unmapped, before.unmapped + 1);
  EXPECT_EQ(s.cached_bytes, 20 * kMiB);
  EXPECT_LE(s.in_use_bytes + s.cached_bytes, 96 * kMiB);
  runtime::release_cached_cpu_blocks();
  EXPECT_EQ(runtime::cpu_allocator_stats().cached_bytes, 0u);
}

TEST(CpuAllocator, SmallTensorsAndRawAllocationsWork) {
  install();
  const auto before = runtime::cpu_allocator_stats();
  auto t = torch::arange(1000, torch::kFloat);
  EXPECT_EQ(addr(t) % 64, 0u);
  EXPECT_DOUBLE_EQ(t.sum().item<double>(), 999.0 * 1000 / 2);
  EXPECT_EQ(runtime::cpu_allocator_stats().in_use_bytes, before.in_use_bytes);
  auto* alloc = c10::GetCPUAllocator();
  for (size_t bytes : {size_t{100}, 12 * kMiB}) {
    void* p = alloc->raw_allocate(bytes);
    ASSERT_NE(p, nullptr);
    static_cast<char*>(p)[bytes - 1] = 1;
    alloc->raw_deallocate(p);
  }
  EXPECT_EQ(runtime::cpu_allocator_stats().in_use_bytes, before.in_use_bytes);
  EXPECT_EQ(torch::empty({0}).numel(), 0);
}

TEST(CpuAllocator, ThreadsAllocatingAndFreeingAtOnceKeepTheirData) {
  install();
  const auto before = runtime::cpu_allocator_stats();
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int id = 1; id <= 4; ++id) {
    threads.emplace_back([id, &bad] {
      std::vector<at::Tensor> live;
      for (int i = 0; i < 40; ++i) {
        const size_t mib = 2 + static_cast<size_t>((id * 7 + i * 5) % 11);  // 2..12 MiB
        auto t = floats_of(mib * kMiB + static_cast<size_t>(i) * 4096);
        t.fill_(static_cast<float>(id));
        live.push_back(t);
        if (live.size() > 3) {  // free out of order: the second oldest
          auto& u = live[1];
          if (u.min().item<float>() != static_cast<float>(id) || u.max().item<float>() != static_cast<float>(id))
            ++bad;
          live.erase(live.begin() + 1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0) << "a tensor's memory was handed to another tensor while still in use";
  EXPECT_EQ(runtime::cpu_allocator_stats().in_use_bytes, before.in_use_bytes);
}

// kB of AnonHugePages in the mapping that holds `p` (/proc/self/smaps).
int64_t huge_kb_at(uintptr_t p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo <= p && p < hi;
      continue;
    }
    if (inside && line.rfind("AnonHugePages:", 0) == 0) return std::stoll(line.substr(14));
  }
  return -1;
}

TEST(CpuAllocator, LargeBlocksGetTransparentHugePages) {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (modes.empty() || modes.find("[never]") != std::string::npos)
    PTK_SKIP_WITHOUT("thp") << "transparent huge pages are off on this machine (" << modes << ")";
  install();
  auto t = floats_of(16 * kMiB);
  t.fill_(1.0f);  // fault every page in
  EXPECT_GT(huge_kb_at(addr(t)), 0) << "no huge pages in the block's mapping; THP modes: " << modes;
}

}  // namespace
}  // namespace ptk
