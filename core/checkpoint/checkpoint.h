// Safetensors files and Hugging Face checkpoint folders as at::Tensor: memory-mapped zero-copy
// reads (single file or sharded through model.safetensors.index.json), sharded writes with the
// index, and whole-folder saves that appear atomically. Not model code (core/model builds on this).
//
// Threading: every function here is safe to call from several threads on different paths; a
// MappedSafetensors may be read from several threads at once (it is immutable once opened).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint/adapter_config.h"     // AdapterConfig
#include "core/checkpoint/hf_config.h"          // Qwen2Config
#include "core/checkpoint/safetensors_header.h"  // SafetensorsHeader

namespace ptk::checkpoint {

// Ordered (name, tensor) list: the order tensors are written in and named_parameters() returns.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
// Name -> tensor, as read.
using TensorMap = std::map<std::string, at::Tensor>;

// One safetensors file mapped read-only into memory (MAP_PRIVATE: writing to a returned tensor
// copies that page privately; the file is never modified). Tensors returned by get() share the
// mapping and keep it alive after this object is gone.
class MappedSafetensors {
 public:
  // Validates the header (parse_safetensors_header); throws ptk::Error naming the file.
  static std::shared_ptr<MappedSafetensors> open(const std::string& path);
  ~MappedSafetensors();
  MappedSafetensors(const MappedSafetensors&) = delete;
  MappedSafetensors& operator=(const MappedSafetensors&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // Zero-copy CPU tensor of the stored dtype and shape (a copy only when the data is misaligned
  // for its dtype). Throws ptk::Error when `name` is absent.
  at::Tensor get(const std::string& name) const;

 private:
  MappedSafetensors() = default;
  std::string path_;
  SafetensorsHeader header_;
  std::shared_ptr<void> mapping_;  // munmap on release
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
};

// Every tensor of one file, zero-copy.
TensorMap read_safetensors(const std::string& path);

// Every tensor of a checkpoint folder: model.safetensors, or the shards named by
// model.safetensors.index.json (each shard must hold exactly the tensors the index assigns it).
// For a PEFT adapter folder: the adapter's tensors (adapter_model.safetensors), under PEFT's names.
TensorMap read_checkpoint_tensors(const std::string& dir);

// Writes one safetensors file exactly as the `safetensors` library does (header keys and data
// sorted by dtype size then name, header padded with spaces to a multiple of 8), so the same
// tensors give the same bytes. Tensors are written from CPU contiguous copies; not atomic by
// itself (save_checkpoint makes the folder atomic). metadata defaults to {"format": "pt"}.
void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
// when the tensors exceed `max_shard_bytes` (shards filled greedily in the given order, as
// save_pretrained). Returns the file names written.
std::vector<std::string> write_sharded_safetensors(const std::string& dir, const NamedTensors& tensors,
                                                   uint64_t max_shard_bytes);

struct SaveOptions {
  // Shard size limit (transformers' default max_shard_size is 5 GB).
  uint64_t max_shard_bytes = 5'000'000'000ull;
  // Folder to copy generation_config.json and the tokenizer files from (tokenizer.json,
  // tokenizer_config.json, vocab.json, merges.txt, special_tokens_map.json, added_tokens.json);
  // "" for none. Without a generation_config.json one is derived from the config.
  std::string source_dir;
  // Where generation_config.json is looked for first, before source_dir ("" = source_dir only): a
  // merged adapter takes its tokenizer from the adapter folder and its generation config from the base.
  std::string generation_config_dir;
  // The chat template the run rendered with when it is not the source folder's own
  // (tokenizer.chat_template set; Tokenizer::chat_template_overridden()): written into the copied
  // tokenizer_config.json's "chat_template" (the list form's "default" entry), and into
  // chat_template.jinja when the source folder has one (transformers reads that file first), so the
  // saved folder renders chats as the model was trained. "" = copy the files as they are.
  std::string chat_template;
};

// Saves a whole HF folder: tensors, config.json (torch_dtype set from the tensors), generation
// config, tokenizer files. Written into "<dir>.tmp-<pid>", fsynced, then swapped into place with
// one rename (renameat2 RENAME_EXCHANGE when `dir` exists), so a crash leaves either the old folder
// or the new one. Not thread-safe for the same `dir`.
void save_checkpoint(const std::string& dir, const Qwen2Config& config, const NamedTensors& tensors,
                     const SaveOptions& options = {});

// Saves a PEFT adapter folder the same way: adapter_config.json, adapter_model.safetensors (the
// tensors under PEFT's names, core/model/lora.h), and the tokenizer files and chat template of
// `options` (max_shard_bytes is not used: PEFT writes one file).
void save_adapter_folder(const std::string& dir, const AdapterConfig& config, const NamedTensors& tensors,
                         const SaveOptions& options = {});

// After a failed write of `what` (the error goes on): removes its partial output `tmp` (a file or a
// folder) and logs a warning naming it and its size, so a full disk gets its space back at once
// rather than at the run's next start (core/train/run_folder.h). Never throws.
void discard_partial_write(const std::string& tmp, const std::string& what);

// "float32" / "bfloat16" / "float16" for config.json's torch_dtype.
std::string torch_dtype_name(at::ScalarType t);

}  // namespace ptk::checkpoint
