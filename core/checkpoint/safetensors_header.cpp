// Safetensors header validation (torch-free; fuzzed by fuzz/safetensors_header_fuzz.cpp).
// Format: u64 little-endian N, N bytes of UTF-8 JSON, then the data section. Not a writer.
#include "core/checkpoint/safetensors_header.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::checkpoint {
namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 8}, {DType::kF32, "F32", 4}, {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
    {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4}, {DType::kI16, "I16", 2}, {DType::kI8, "I8", 1},
    {DType::kU8, "U8", 1},   {DType::kBool, "BOOL", 1},
};

// Largest number of dimensions accepted; real tensors have at most a handful.
constexpr size_t kMaxDims = 16;

[[noreturn]] void refuse(const std::string& origin, const std::string& what) {
  throw Error(origin + ": not a valid safetensors file: " + what +
              "\n---> HINT: the file is truncated or corrupt; re-download or re-save it "
              "(safetensors.torch.save_file / save_pretrained).");
}

}  // namespace

const char* dtype_name(DType d) {
  for (const auto& i : kDTypes)
    if (i.dtype == d) return i.name;
  return "?";
}

size_t dtype_size(DType d) {
  for (const auto& i : kDTypes)
    if (i.dtype == d) return i.size;
  return 0;
}

bool dtype_from_name(const std::string& name, DType* out) {
  for (const auto& i : kDTypes) {
    if (name == i.name) {
      *out = i.dtype;
      return true;
    }
  }
  return false;
}

uint64_t TensorEntry::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

const TensorEntry* SafetensorsHeader::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, const std::string& origin) {
  if (size < 8) refuse(origin, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte length prefix");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];  // little-endian, independent of host order
  if (n > kMaxHeaderBytes)
    refuse(origin, "header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxHeaderBytes) +
                       "-byte limit");
  if (n > size - 8)
    refuse(origin, "header length " + std::to_string(n) + " runs past the end of the " + std::to_string(size) +
                       "-byte file");
  if (n < 2 || data[8] != '{') refuse(origin, "header does not start with a JSON object '{'");

  SafetensorsHeader h;
  h.header_len = n;
  h.data_start = 8 + n;
  const uint64_t data_size = size - h.data_start;

  // Iterative parsing, and ptk's one depth limit on top: a header of nested brackets neither
  // exhausts the stack nor builds a deep document. Only whitespace may follow the object (writers
  // pad with spaces to a multiple of 8).
  rapidjson::Document doc;
  json::ParseStatus st = json::parse_into<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag>(
      doc, std::string_view(reinterpret_cast<const char*>(data + 8), n));
  if (!st.ok())
    refuse(origin, "header JSON is invalid at byte " + std::to_string(st.offset) + ": " + st.message());
  if (!doc.IsObject()) refuse(origin, "header JSON is not an object");

  std::set<std::string> seen;
  for (auto it = doc.MemberBegin(); it != doc.MemberEnd(); ++it) {
    std::string name(it->name.GetString(), it->name.GetStringLength());
    if (!seen.insert(name).second) refuse(origin, "tensor name '" + name + "' appears twice");
    const auto& v = it->value;
    if (name == "__metadata__") {
      if (!v.IsObject()) refuse(origin, "__metadata__ is not an object of strings");
      for (auto m = v.MemberBegin(); m != v.MemberEnd(); ++m) {
        if (!m->value.IsString()) refuse(origin, "__metadata__ value of '" + std::string(m->name.GetString()) +
                                                     "' is not a string");
        h.metadata[std::string(m->name.GetString(), m->name.GetStringLength())] =
            std::string(m->value.GetString(), m->value.GetStringLength());
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.IsObject()) refuse(origin, where + " is not an object");
    auto dt = v.FindMember("dtype");
    auto sh = v.FindMember("shape");
    auto off = v.FindMember("data_offsets");
    if (dt == v.MemberEnd() || !dt->value.IsString()) refuse(origin, where + " has no string 'dtype'");
    if (sh == v.MemberEnd() || !sh->value.IsArray()) refuse(origin, where + " has no array 'shape'");
    if (off == v.MemberEnd() || !off->value.IsArray() || off->value.Size() != 2)
      refuse(origin, where + " has no two-element 'data_offsets'");
    TensorEntry t;
    t.name = name;
    std::string dname(dt->value.GetString(), dt->value.GetStringLength());
    if (!dtype_from_name(dname, &t.dtype))
      refuse(origin, where + " has dtype '" + dname + "', which ptk does not read (F32, BF16, F16, F64, I64, I32, "
                                                      "I16, I8, U8, BOOL)");
    if (sh->value.Size() > kMaxDims) refuse(origin, where + " has more than 16 dimensions");
    uint64_t bytes = dtype_size(t.dtype);
    for (const auto& d : sh->value.GetArray()) {
      if (!d.IsUint64() || d.GetUint64() > static_cast<uint64_t>(INT64_MAX))
        refuse(origin, where + " has a shape entry that is not a non-negative integer");
      uint64_t dim = d.GetUint64();
      // Overflow-checked: bytes * dim must stay within the file.
      if (dim != 0 && bytes > UINT64_MAX / dim) refuse(origin, where + " has a shape whose byte count overflows");
      bytes *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& o = off->value;
    if (!o[0].IsUint64() || !o[1].IsUint64()) refuse(origin, where + " has data_offsets that are not integers");
    t.begin = o[0].GetUint64();
    t.end = o[1].GetUint64();
    if (t.begin > t.end)
      refuse(origin, where + " has reversed data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                         "]");
    if (t.end > data_size)
      refuse(origin, where + " has data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                         "] past the end of the " + std::to_string(data_size) + "-byte data section");
    if (t.end - t.begin != bytes)
      refuse(origin, where + ": dtype " + dname + " x shape needs " + std::to_string(bytes) +
                         " bytes but data_offsets span " + std::to_string(t.end - t.begin));
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // The data section is covered exactly once: no overlap, no hole, nothing left over.
  uint64_t cursor = 0;
  for (const auto& t : h.tensors) {
    if (t.begin < cursor) refuse(origin, "tensor '" + t.name + "' overlaps the tensor before it");
    if (t.begin > cursor)
      refuse(origin, "bytes [" + std::to_string(cursor) + ", " + std::to_string(t.begin) +
                         ") of the data section belong to no tensor (before '" + t.name + "')");
    cursor = t.end;
  }
  if (cursor != data_size)
    refuse(origin, "the data section is " + std::to_string(data_size) + " bytes but the tensors cover " +
                       std::to_string(cursor));
  return h;
}

}  // namespace ptk::checkpoint
