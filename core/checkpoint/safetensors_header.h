// The safetensors header parser: length prefix, JSON header, dtype/shape/offset validation.
// Torch-free on purpose, so the libFuzzer harness in fuzz/ can hammer it. Not a tensor reader
// (see core/checkpoint/safetensors.h, which maps files and wraps the bytes as at::Tensor).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ptk::checkpoint {

// The dtypes of the safetensors format that ptk reads. Model weights use F32, BF16 and F16.
enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

const char* dtype_name(DType d);        // "F32", "BF16", ...
size_t dtype_size(DType d);             // bytes per element
bool dtype_from_name(const std::string& name, DType* out);  // false for names ptk does not read

struct TensorEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  uint64_t numel() const;
};

struct SafetensorsHeader {
  uint64_t header_len = 0;   // the little-endian u64 at offset 0
  uint64_t data_start = 0;   // 8 + header_len: file offset of the data section
  std::vector<TensorEntry> tensors;             // sorted by begin offset (file order)
  std::map<std::string, std::string> metadata;  // "__metadata__" (string -> string)
  const TensorEntry* find(const std::string& name) const;  // nullptr when absent
};

// Largest header accepted (the reference implementation's limit): 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Parses and validates the header of a safetensors file whose whole content is [data, data+size).
// Refuses with ptk::Error naming `origin` (and the tensor) when: the file is shorter than 8 bytes,
// the header length runs past the end or over kMaxHeaderBytes, the JSON is invalid or not an object,
// a dtype is unknown, a shape is negative or its byte count overflows, data_offsets are reversed,
// out of range, overlapping, leave holes, or disagree with dtype x shape, or a name repeats.
// Reads only inside [data, data+size); never touches the data section.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, const std::string& origin);

}  // namespace ptk::checkpoint
