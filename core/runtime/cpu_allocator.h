// LibTorch's CPU allocator for training: large tensors on transparent huge pages, freed blocks kept
// for the next step instead of going back to the kernel.
//
// Why: a 0.5B training step allocates and frees ~4 GB of activations and gradients. Returned to the
// kernel, every step page-faults them back in (2 M faults, 8 s of kernel CPU a step measured here);
// on 4 KiB pages, the element-wise passes over 20 MB tensors and AdamW over 6 GB of state miss the
// TLB (MulBackward + SiluBackward 1.26 -> 0.71 s a step on 2 MiB pages, train_step_bench).
//
// How: a block of min_bytes or more is its own 2 MiB-aligned anonymous mapping, advised
// MADV_HUGEPAGE. On free it goes to a cache; a later request takes the smallest cached block that
// fits (the tail of a much larger one is unmapped first). A request that nothing fits maps a new
// block, after unmapping least recently freed blocks while mapped bytes would pass the limit.
// Smaller requests go to malloc, 64-byte aligned, as LibTorch's default allocator does.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ptk::runtime {

struct CpuAllocatorOptions {
  size_t min_bytes = size_t{2} << 20;  // smaller requests go to malloc
  bool keep_freed = true;              // false: unmap a large block when it is freed
  bool huge_pages = true;              // madvise(MADV_HUGEPAGE) each large block
  // Cached blocks are unmapped (least recently freed first) when mapping a new block would take
  // in-use + cached bytes past this. 0: 80% of physical memory (or of the cgroup's limit), divided
  // by LOCAL_WORLD_SIZE where several ranks share the machine.
  size_t limit_bytes = 0;
};

struct CpuAllocatorStats {
  size_t in_use_bytes = 0;  // large blocks handed out
  size_t cached_bytes = 0;  // large blocks freed and kept
  int64_t hits = 0;    // requests served from the cache
  int64_t misses = 0;  // requests that mapped a new block
  int64_t unmapped = 0;  // cached blocks given back to the kernel (the limit, release_cached_cpu_blocks)
};

// Makes this LibTorch's CPU allocator (c10::SetCPUAllocator). Tensors allocated before keep their
// own deleter. Returns false where it cannot run (not Linux); the default allocator then stays.
// Call once, before the model is built; later calls change nothing and return the first result.
bool install_cpu_allocator(const CpuAllocatorOptions& options = {});

bool cpu_allocator_installed();

// Unmaps every cached block (in-use blocks stay).
void release_cached_cpu_blocks();

CpuAllocatorStats cpu_allocator_stats();

}  // namespace ptk::runtime
