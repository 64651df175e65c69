#include "core/kernels/dispatch.h"

#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "core/config/sections.h"
#include "core/util/error.h"

namespace ptk::kernels {
namespace {

template <class E>
E from_name(const std::vector<std::string>& names, const std::string& value, const char* key) {
  auto it = std::find(names.begin(), names.end(), value);
  if (it == names.end()) {
    std::string all;
    for (const auto& n : names) all += (all.empty() ? "" : " | ") + n;
    throw Error(std::string(key) + " = \"" + value + "\" is not a kernel: " + all);
  }
  return static_cast<E>(it - names.begin());
}

std::mutex g_mutex;
std::optional<Options> g_options;  // configure() / ScopedOptions; empty: the environment aliases

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

const std::vector<std::string>& attention_names() {
  static const std::vector<std::string> n{"auto", "ref", "cpu_flash", "cpu_block", "sdpa", "flash_varlen"};
  return n;
}
const std::vector<std::string>& packed_attention_names() {
  static const std::vector<std::string> n{"auto", "batched", "per_document"};
  return n;
}
const std::vector<std::string>& decode_attention_names() {
  static const std::vector<std::string> n{"auto", "rows", "window", "gather", "batched"};
  return n;
}
const std::vector<std::string>& lm_head_names() {
  static const std::vector<std::string> n{"auto", "cpu_rows", "ref"};
  return n;
}
std::string name(Attention a) { return attention_names().at(static_cast<size_t>(a)); }
std::string name(PackedAttention a) { return packed_attention_names().at(static_cast<size_t>(a)); }
std::string name(DecodeAttention a) { return decode_attention_names().at(static_cast<size_t>(a)); }
std::string name(LmHead a) { return lm_head_names().at(static_cast<size_t>(a)); }

Options parse_options(const std::string& attention, int64_t block_rows, const std::string& packed_attention,
                      const std::string& decode_attention, const std::string& lm_head) {
  Options o;
  o.attention = from_name<Attention>(attention_names(), attention, "kernels.attention");
  PTK_CHECK(block_rows >= 0, "kernels.attention_block_rows must be >= 0 (0 = default), got " +
                                 std::to_string(block_rows));
  o.attention_block_rows = block_rows;
  o.packed_attention = from_name<PackedAttention>(packed_attention_names(), packed_attention, "kernels.packed_attention");
  o.decode_attention = from_name<DecodeAttention>(decode_attention_names(), decode_attention, "kernels.decode_attention");
  o.lm_head = from_name<LmHead>(lm_head_names(), lm_head, "kernels.lm_head");
  return o;
}

Options options_from(const config::KernelsSection& k) {
  return parse_options(k.attention, k.attention_block_rows, k.packed_attention, k.decode_attention, k.lm_head);
}

const Options& env_options() {
  static const Options o = [] {
    Options e;
    // PTK_ATTENTION_BLOCK_ROWS=0: the masked full square for every dtype (flash included) = ref.
    const std::string block = env("PTK_ATTENTION_BLOCK_ROWS");
    if (!block.empty()) {
      const int64_t n = std::max<int64_t>(0, std::atoll(block.c_str()));
      if (n == 0) e.attention = Attention::kRef;
      else e.attention_block_rows = n;
    }
    if (e.attention == Attention::kAuto && env("PTK_ATTENTION_FLASH") == "0") e.attention = Attention::kCpuBlock;
    e.attention_cpu_only = e.attention != Attention::kAuto;
    const std::string packed = env("PTK_PACKED_ATTENTION");
    if (packed == "per-document" || packed == "per_document") e.packed_attention = PackedAttention::kPerDocument;
    const std::string decode = env("PTK_DECODE_ATTENTION");
    if (decode == "window") e.decode_attention = DecodeAttention::kWindow;
    if (decode == "gather") e.decode_attention = DecodeAttention::kGather;
    if (decode == "rows") e.decode_attention = DecodeAttention::kRows;
    if (env("PTK_LM_HEAD_ROWS") == "aten") e.lm_head = LmHead::kRef;
    return e;
  }();
  return o;
}

void configure(const Options& recipe) {
  Options o = env_options();
  if (recipe.attention != Attention::kAuto) {
    o.attention = recipe.attention;
    o.attention_cpu_only = false;
  }
  if (recipe.attention_block_rows != 0) o.attention_block_rows = recipe.attention_block_rows;
  if (recipe.packed_attention != PackedAttention::kAuto) o.packed_attention = recipe.packed_attention;
  if (recipe.decode_attention != DecodeAttention::kAuto) o.decode_attention = recipe.decode_attention;
  if (recipe.lm_head != LmHead::kAuto) o.lm_head = recipe.lm_head;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_options = o;
}

Options options() {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_options) return *g_options;
  }
  return env_options();
}

ScopedOptions::ScopedOptions(const Options& o) {
  std::lock_guard<std::mutex> lock(g_mutex);
  saved_ = g_options;
  g_options = o;
}
ScopedOptions::~ScopedOptions() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_options = saved_;
}

// ---- selection ----------------------------------------------------------------------------------

bool flash_varlen_serves(const AttentionCall& c) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  const bool half = c.dtype == c10::ScalarType::BFloat16 || c.dtype == c10::ScalarType::Half;
  return c.device == c10::DeviceType::CUDA && half && c.head_dim > 0 && c.head_dim <= 256 && c.head_dim % 8 == 0;
#else
  (void)c;
  return false;
#endif
}

Attention select_attention(const AttentionCall& c, const Options& o) {
  const bool cpu_f32 = c.device == c10::DeviceType::CPU && c.dtype == c10::ScalarType::Float;
  const bool flash_ok = cpu_f32 && c.cpu_avx512 && c.head_dim % 16 == 0;
  auto automatic = [&] {
    if (c.device == c10::DeviceType::CUDA) return c.packed && flash_varlen_serves(c) ? Attention::kFlashVarlen : Attention::kSdpa;
    if (flash_ok) return Attention::kCpuFlash;
    if (cpu_f32) return Attention::kCpuBlock;
    return Attention::kRef;
  };
  if (o.attention_cpu_only && c.device != c10::DeviceType::CPU) return automatic();
  switch (o.attention) {
    case Attention::kRef:
    case Attention::kSdpa:
      return o.attention;  // ATen ops: any device, any dtype
    case Attention::kCpuFlash:
      return flash_ok ? Attention::kCpuFlash : automatic();
    case Attention::kCpuBlock:
      // Also what PTK_ATTENTION_FLASH=0 means: the CPU float32 path without flash; elsewhere auto.
      return cpu_f32 ? Attention::kCpuBlock : automatic();
    case Attention::kFlashVarlen:
      return flash_varlen_serves(c) ? Attention::kFlashVarlen : automatic();
    case Attention::kAuto:
      break;
  }
  return automatic();
}

int64_t attention_block_rows(const Options& o) { return o.attention_block_rows > 0 ? o.attention_block_rows : 128; }

PackedAttention select_packed_attention(const Options& o) {
  return o.packed_attention == PackedAttention::kPerDocument ? PackedAttention::kPerDocument : PackedAttention::kBatched;
}

DecodeAttention select_decode_attention(const DecodeCall& c, const Options& o) {
  switch (o.decode_attention) {
    case DecodeAttention::kWindow:
    case DecodeAttention::kGather:
    case DecodeAttention::kBatched:
      return o.decode_attention;
    case DecodeAttention::kRows:
    case DecodeAttention::kAuto:
      break;
  }
  return c.rows_supported ? DecodeAttention::kRows : DecodeAttention::kBatched;
}

LmHead select_lm_head(bool rows_supported, const Options& o) {
  if (o.lm_head == LmHead::kRef) return LmHead::kRef;
  return rows_supported ? LmHead::kCpuRows : LmHead::kRef;
}

bool sparse_embedding_grad(c10::DeviceType device) { return device == c10::DeviceType::CPU; }

}  // namespace ptk::kernels
