// libFuzzer harness for the safetensors header parser (core/checkpoint/safetensors_header.h):
// any bytes must give either a header whose every tensor lies inside the file, or ptk::Error.
// Not a tensor-reading fuzzer (the LibTorch side only wraps what this parser accepted).
#include <cstdint>
#include <cstdlib>

#include "core/checkpoint/safetensors_header.h"
#include "core/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ptk::checkpoint;
  try {
    auto h = parse_safetensors_header(data, size, "fuzz-input");
    // Invariants the mmap reader relies on: every byte range inside the data section, in order,
    // byte counts equal to dtype x shape.
    if (h.data_start != 8 + h.header_len || h.data_start > size) abort();
    uint64_t cursor = 0;
    for (const auto& t : h.tensors) {
      if (t.begin != cursor || t.end < t.begin || t.end > size - h.data_start) abort();
      if (t.numel() * dtype_size(t.dtype) != t.end - t.begin) abort();
      cursor = t.end;
    }
    if (cursor != size - h.data_start) abort();
  } catch (const ptk::Error&) {
    // refused with a message: the expected outcome for hostile input
  }
  return 0;
}
