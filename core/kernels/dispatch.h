// The one place that picks a kernel: by the tensors' device and dtype, and by the options the
// recipe declares (`kernels.*`, core/config KernelsSection) — model code asks here instead of
// reading environment variables. Three families of kernels (core/kernels/):
//   ref/   ATen only, any device (CPU, CUDA, meta): the exact reference every other kernel equals;
//   cpu/   ptk's AVX-512 float32 kernels (flash / block attention, per-row decode attention,
//          packed decode linears, the lm_head op's row passes);
//   cuda/  ATen's fused GPU kernels (SDPA with enable_gqa, varlen flash attention for packed rows).
// A forced choice that cannot serve a call (e.g. cpu_flash on a bf16 tensor, flash_varlen on the
// CPU) falls back to what `auto` picks there, so a recipe that names one kernel still runs anywhere.
//
// Options are set once per process (configure(), from the stages' recipe) before any forward;
// until then, and for `auto` values, the environment variables below are read once, as documented
// aliases of the keys (PTK_ATTENTION_FLASH=0, PTK_ATTENTION_BLOCK_ROWS=N, PTK_PACKED_ATTENTION=
// per-document, PTK_DECODE_ATTENTION=rows|window|gather, PTK_LM_HEAD_ROWS=aten). A value set in the
// recipe (not `auto`) wins over its alias.
#pragma once
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ptk::config {
struct KernelsSection;
}

namespace ptk::kernels {

// Causal attention of training forwards and prefills.
enum class Attention {
  kAuto,        // cuda: flash_varlen for packed bf16/fp16 rows where the torch has it, else sdpa;
                // cpu float32: cpu_flash (AVX-512, head size % 16 == 0), else cpu_block; else ref
  kRef,         // ref::causal_attention: masked full square, ATen matmuls, any device and dtype
  kCpuFlash,    // cpu::causal_flash_attention (float32, AVX-512)
  kCpuBlock,    // cpu::causal_block_attention (float32): blocks of queries skip the masked half
  kSdpa,        // at::scaled_dot_product_attention(enable_gqa): fused kernels on CUDA, math on CPU
  kFlashVarlen  // cuda::flash_varlen_attention: packed documents in one call (cu_seqlens), CUDA bf16/fp16
};
// How packed rows' documents are attended by a per-document kernel (not flash_varlen).
enum class PackedAttention {
  kAuto,        // batched
  kBatched,     // short documents gathered into padded batches, one attention per batch
  kPerDocument  // one attention per document (the old loop; slow at short documents)
};
// One decode step's attention over the KV cache (forward_cached with one token per row).
enum class DecodeAttention {
  kAuto,    // rows where cpu::decode_attention_rows serves (CPU float32, AVX-512), else window/gather
  kRows,    // cpu::decode_attention_rows: each row reads only its own keys
  kWindow,  // ref: the busy slots' range of the cache read in place
  kGather,  // ref: each row's keys copied out (index_select)
  kBatched  // ref: window or gather, whichever costs less (what auto does off the AVX-512 CPU)
};
// The lm_head log-prob op's per-row passes over fp32 logits.
enum class LmHead {
  kAuto,     // cpu_rows where they serve (CPU float32, AVX-512), else ref
  kCpuRows,  // cpu::lm_head_row_stats / lm_head_logp_grad_inplace
  kRef       // ATen ops
};

struct Options {
  Attention attention = Attention::kAuto;
  // Query positions per block of cpu_block; 0 = default (128).
  int64_t attention_block_rows = 0;
  PackedAttention packed_attention = PackedAttention::kAuto;
  DecodeAttention decode_attention = DecodeAttention::kAuto;
  LmHead lm_head = LmHead::kAuto;
  // `attention` came from an env alias (PTK_ATTENTION_*), which names CPU kernels: on other devices
  // attention stays auto.
  bool attention_cpu_only = false;
};

// Names as the recipe spells them (kernels.attention = "cpu_flash", ...) and back.
const std::vector<std::string>& attention_names();         // auto ref cpu_flash cpu_block sdpa flash_varlen
const std::vector<std::string>& packed_attention_names();  // auto batched per_document
const std::vector<std::string>& decode_attention_names();  // auto rows window gather batched
const std::vector<std::string>& lm_head_names();           // auto cpu_rows ref
std::string name(Attention a);
std::string name(PackedAttention a);
std::string name(DecodeAttention a);
std::string name(LmHead a);
// Throws ptk::Error naming `key` and the accepted values for an unknown name.
Options parse_options(const std::string& attention, int64_t attention_block_rows, const std::string& packed_attention,
                      const std::string& decode_attention, const std::string& lm_head);

// The recipe's `kernels` section as Options (parse_options).
Options options_from(const config::KernelsSection& section);

// The environment aliases as Options (`auto` where unset), read once per process.
const Options& env_options();
// Sets this process's options: each field that is not auto (block rows: not 0) wins, the others
// keep their environment alias. Call before any forward (the stages do, from the recipe).
void configure(const Options& recipe);
// The options in force: configure()'s, else the environment aliases.
Options options();
// For tests: sets the options in force (no environment merge) while alive, then restores.
class ScopedOptions {
 public:
  explicit ScopedOptions(const Options& o);
  ~ScopedOptions();
  ScopedOptions(const ScopedOptions&) = delete;
  ScopedOptions& operator=(const ScopedOptions&) = delete;

 private:
  std::optional<Options> saved_;
};

// ---- selection: pure functions of (device, dtype, shape facts, options), testable anywhere ----

// What an attention call looks like.
struct AttentionCall {
  c10::DeviceType device = c10::DeviceType::CPU;
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t head_dim = 64;
  bool packed = false;       // rows of several documents (or left padding) that must not attend across
  bool cpu_avx512 = false;   // this CPU has AVX-512F (cpu::cpu_has_avx512f(); a parameter so tests choose)
};
// The kernel a call gets: never kAuto, and always one that can serve the call.
Attention select_attention(const AttentionCall& call, const Options& o);
// Whether ATen's varlen flash attention can run a call (CUDA, bf16/fp16, head size <= 256 and a
// multiple of 8, a torch with the op's cu_seqlens interface: 2.3 or later).
bool flash_varlen_serves(const AttentionCall& call);
// The cpu_block block size in force.
int64_t attention_block_rows(const Options& o);
// Packed rows: per-document loop or padded batches.
PackedAttention select_packed_attention(const Options& o);

struct DecodeCall {
  c10::DeviceType device = c10::DeviceType::CPU;
  c10::ScalarType dtype = c10::ScalarType::Float;
  bool rows_supported = false;  // cpu::decode_attention_rows_supported(q, cache) held
};
// kRows, kWindow, kGather or kBatched (never kAuto).
DecodeAttention select_decode_attention(const DecodeCall& call, const Options& o);

// kCpuRows or kRef; rows_supported = cpu::lm_head_rows_supported(z).
LmHead select_lm_head(bool rows_supported, const Options& o);

// Whether the tied embedding takes a sparse gradient (CPU: T rows added into the dense lm_head
// gradient in place; elsewhere a dense one, which CUDA adds with one fast kernel).
bool sparse_embedding_grad(c10::DeviceType device);

}  // namespace ptk::kernels
