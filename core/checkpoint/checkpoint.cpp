// Safetensors mmap reads, safetensors/sharded writes and atomic HF folder saves (LibTorch side).
// Not the header validation (safetensors_header.cpp) nor config.json (hf_config.cpp).
#include "core/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>

#include "core/runtime/log.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors is little-endian; ptk maps it directly");

namespace ptk::checkpoint {
namespace {

at::ScalarType to_scalar_type(DType d) {
  switch (d) {
    case DType::kF64: return at::kDouble;
    case DType::kF32: return at::kFloat;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kI64: return at::kLong;
    case DType::kI32: return at::kInt;
    case DType::kI16: return at::kShort;
    case DType::kI8: return at::kChar;
    case DType::kU8: return at::kByte;
    case DType::kBool: return at::kBool;
  }
  return at::kFloat;
}

DType from_scalar_type(at::ScalarType t, const std::string& name) {
  switch (t) {
    case at::kDouble: return DType::kF64;
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    case at::kLong: return DType::kI64;
    case at::kInt: return DType::kI32;
    case at::kShort: return DType::kI16;
    case at::kChar: return DType::kI8;
    case at::kByte: return DType::kU8;
    case at::kBool: return DType::kBool;
    default: break;
  }
  throw Error("tensor '" + name + "' has dtype " + std::string(c10::toString(t)) + ", which safetensors cannot store");
}

// The `safetensors` library orders tensors by its Dtype enum, descending, then by name.
int safetensors_rank(DType d) {
  switch (d) {
    case DType::kBool: return 0;
    case DType::kU8: return 1;
    case DType::kI8: return 2;
    case DType::kI16: return 5;
    case DType::kF16: return 7;
    case DType::kBF16: return 8;
    case DType::kI32: return 9;
    case DType::kF32: return 11;
    case DType::kF64: return 12;
    case DType::kI64: return 13;
  }
  return 0;
}

std::string errno_text() { return std::strerror(errno); }

struct FileCloser {
  FILE* f;
  ~FileCloser() {
    if (f) fclose(f);
  }
};

void write_all(FILE* f, const void* data, size_t n, const std::string& path) {
  if (n && fwrite(data, 1, n, f) != n) throw Error(path + ": write failed: " + errno_text() + " (disk full?)");
}

const char* kTokenizerFiles[] = {"tokenizer.json",          "tokenizer_config.json", "vocab.json", "merges.txt",
                                 "special_tokens_map.json", "added_tokens.json",     "chat_template.jinja"};

// tokenizer_config.json's text with its chat template replaced by `tmpl` (added when absent; in the
// list form, the "default" entry's), other keys kept in order. An unreadable config is written anew.
std::string with_chat_template(const std::string& config_text, const std::string& tmpl, const std::string& origin) {
  rapidjson::Document d;
  if (!config_text.empty()) d = json::parse(config_text, origin);
  if (!d.IsObject()) d.SetObject();
  auto& a = d.GetAllocator();
  rapidjson::Value t(tmpl.c_str(), static_cast<rapidjson::SizeType>(tmpl.size()), a);
  auto it = d.FindMember("chat_template");
  bool done = false;
  if (it != d.MemberEnd() && it->value.IsArray()) {
    for (auto& e : it->value.GetArray())
      if (e.IsObject() && e.HasMember("name") && e["name"].IsString() && std::string(e["name"].GetString()) == "default" &&
          e.HasMember("template")) {
        e["template"] = t;
        done = true;
      }
  }
  if (!done) {
    if (it != d.MemberEnd()) {
      it->value = t;
    } else {
      d.AddMember("chat_template", t, a);
    }
  }
  return json::to_string(d, /*pretty=*/true) + "\n";
}

}  // namespace

std::string torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    default: return c10::toString(t);
  }
}

// ---- reading ----------------------------------------------------------------------------------

std::shared_ptr<MappedSafetensors> MappedSafetensors::open(const std::string& path) {
  // The type check comes before open() can block: a FIFO named model.safetensors hung here forever.
  int fd = open_regular_file(path);
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(path + ": cannot stat: " + errno_text());
  }
  size_t size = static_cast<size_t>(st.st_size);
  void* addr = nullptr;
  if (size > 0) {
    // PROT_WRITE with MAP_PRIVATE: in-place updates (optimizer steps) copy pages, never the file.
    addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
      ::close(fd);
      throw Error(path + ": mmap failed: " + errno_text());
    }
  }
  ::close(fd);
  std::shared_ptr<MappedSafetensors> f(new MappedSafetensors());
  f->path_ = path;
  f->size_ = size;
  f->base_ = static_cast<const uint8_t*>(addr);
  f->mapping_ = std::shared_ptr<void>(addr, [size](void* p) {
    if (p) munmap(p, size);
  });
  static const uint8_t kEmpty[1] = {0};
  f->header_ = parse_safetensors_header(size ? f->base_ : kEmpty, size, path);
  return f;
}

MappedSafetensors::~MappedSafetensors() = default;

at::Tensor MappedSafetensors::get(const std::string& name) const {
  const TensorEntry* e = header_.find(name);
  if (!e) throw Error(path_ + ": no tensor named '" + name + "'");
  auto options = at::TensorOptions().dtype(to_scalar_type(e->dtype)).device(at::kCPU);
  if (e->begin == e->end) return at::empty(e->shape, options);
  auto* ptr = const_cast<uint8_t*>(base_ + header_.data_start + e->begin);
  auto keep = mapping_;
  at::Tensor t = torch::from_blob(ptr, e->shape, [keep](void*) mutable { keep.reset(); }, options);
  if (reinterpret_cast<uintptr_t>(ptr) % dtype_size(e->dtype) != 0) t = t.clone();  // misaligned data
  return t;
}

TensorMap read_safetensors(const std::string& path) {
  auto f = MappedSafetensors::open(path);
  TensorMap out;
  for (const auto& e : f->header().tensors) out[e.name] = f->get(e.name);
  return out;
}

TensorMap read_checkpoint_tensors(const std::string& dir) {
  if (is_adapter_folder(dir)) return read_safetensors(dir + "/" + kAdapterWeightsFile);
  const std::string index = dir + "/model.safetensors.index.json";
  if (!path_exists(index)) {
    if (!path_exists(dir + "/model.safetensors"))
      throw Error(dir + ": no model.safetensors or model.safetensors.index.json\n---> HINT: ptk reads Hugging Face "
                  "folders saved with safetensors (save_pretrained(..., safe_serialization=True)).");
    return read_safetensors(dir + "/model.safetensors");
  }
  auto doc = json::parse_file(index);
  auto wm = doc.IsObject() ? doc.FindMember("weight_map") : doc.MemberEnd();
  if (!doc.IsObject() || wm == doc.MemberEnd() || !wm->value.IsObject())
    throw Error(index + ": no \"weight_map\" object");
  std::map<std::string, std::vector<std::string>> by_file;
  for (auto m = wm->value.MemberBegin(); m != wm->value.MemberEnd(); ++m) {
    if (!m->value.IsString()) throw Error(index + ": weight_map value of '" + m->name.GetString() + "' is not a string");
    std::string file = m->value.GetString();
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
      throw Error(index + ": shard name '" + file + "' must be a file name inside the folder");
    by_file[file].push_back(m->name.GetString());
  }
  TensorMap out;
  for (const auto& [file, names] : by_file) {
    auto f = MappedSafetensors::open(dir + "/" + file);
    for (const auto& n : names) {
      if (!f->header().find(n))
        throw Error(index + " says '" + n + "' is in " + file + ", but that shard has no such tensor");
      out[n] = f->get(n);
    }
  }
  return out;
}

// ---- writing ----------------------------------------------------------------------------------

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata) {
  struct Item {
    const std::string* name;
    at::Tensor t;
    DType dtype;
  };
  std::vector<Item> items;
  for (const auto& [name, t] : tensors) {
    PTK_CHECK(t.defined(), path + ": tensor '" + name + "' is undefined");
    items.push_back({&name, t.detach().to(at::kCPU).contiguous(), from_scalar_type(t.scalar_type(), name)});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    int ra = safetensors_rank(a.dtype), rb = safetensors_rank(b.dtype);
    return ra != rb ? ra > rb : *a.name < *b.name;
  });
  for (size_t i = 1; i < items.size(); ++i)
    if (*items[i].name == *items[i - 1].name) throw Error(path + ": tensor name '" + *items[i].name + "' repeats");

  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  w.StartObject();
  if (!metadata.empty()) {
    w.Key("__metadata__");
    w.StartObject();
    for (const auto& [k, v] : metadata) {
      w.Key(k.c_str(), static_cast<rapidjson::SizeType>(k.size()));
      w.String(v.c_str(), static_cast<rapidjson::SizeType>(v.size()));
    }
    w.EndObject();
  }
  uint64_t offset = 0;
  for (const auto& it : items) {
    w.Key(it.name->c_str(), static_cast<rapidjson::SizeType>(it.name->size()));
    w.StartObject();
    w.Key("dtype");
    w.String(dtype_name(it.dtype));
    w.Key("shape");
    w.StartArray();
    for (int64_t d : it.t.sizes()) w.Uint64(static_cast<uint64_t>(d));
    w.EndArray();
    uint64_t bytes = static_cast<uint64_t>(it.t.numel()) * dtype_size(it.dtype);
    w.Key("data_offsets");
    w.StartArray();
    w.Uint64(offset);
    w.Uint64(offset + bytes);
    w.EndArray();
    w.EndObject();
    offset += bytes;
  }
  w.EndObject();
  std::string header(buf.GetString(), buf.GetSize());
  header.append((8 - header.size() % 8) % 8, ' ');
  uint8_t len[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));

  FileCloser fc{fopen(path.c_str(), "wb")};
  if (!fc.f) throw Error(path + ": cannot create: " + errno_text());
  write_all(fc.f, len, 8, path);
  write_all(fc.f, header.data(), header.size(), path);
  for (const auto& it : items)
    write_all(fc.f, it.t.data_ptr(), static_cast<size_t>(it.t.numel()) * dtype_size(it.dtype), path);
  if (fflush(fc.f) != 0 || fsync(fileno(fc.f)) != 0) throw Error(path + ": flush failed: " + errno_text());
}

std::vector<std::string> write_sharded_safetensors(const std::string& dir, const NamedTensors& tensors,
                                                   uint64_t max_shard_bytes) {
  std::vector<NamedTensors> shards(1);
  uint64_t current = 0, total = 0;
  for (const auto& nt : tensors) {
    uint64_t bytes = static_cast<uint64_t>(nt.second.numel()) * nt.second.element_size();
    if (!shards.back().empty() && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(nt);
    current += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    write_safetensors(dir + "/model.safetensors", tensors);
    return {"model.safetensors"};
  }
  std::vector<std::string> names;
  rapidjson::Document index;
  index.SetObject();
  auto& a = index.GetAllocator();
  rapidjson::Value meta(rapidjson::kObjectType), wm(rapidjson::kObjectType);
  meta.AddMember("total_size", rapidjson::Value(total), a);
  std::map<std::string, std::string> weight_map;  // sorted, as transformers writes it
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    write_safetensors(dir + "/" + name, shards[i]);
    names.push_back(name);
    for (const auto& nt : shards[i]) weight_map[nt.first] = name;
  }
  for (const auto& [k, v] : weight_map)
    wm.AddMember(rapidjson::Value(k.c_str(), a), rapidjson::Value(v.c_str(), a), a);
  index.AddMember("metadata", meta, a);
  index.AddMember("weight_map", wm, a);
  std::string text = json::to_string(index, true);
  // transformers: json.dumps(indent=2, sort_keys=True) + "\n"
  FileCloser fc{fopen((dir + "/model.safetensors.index.json").c_str(), "wb")};
  if (!fc.f) throw Error(dir + "/model.safetensors.index.json: cannot create: " + errno_text());
  text += "\n";
  write_all(fc.f, text.data(), text.size(), dir + "/model.safetensors.index.json");
  if (fflush(fc.f) != 0 || fsync(fileno(fc.f)) != 0) throw Error(dir + ": flush failed: " + errno_text());
  names.push_back("model.safetensors.index.json");
  return names;
}

void discard_partial_write(const std::string& tmp, const std::string& what) {
  std::string done = remove_partial(tmp);
  if (!done.empty()) log::warn("writing " + what + " failed; " + done);
}

namespace {
using WriteText = std::function<void(const std::string& name, const std::string& text)>;

// A folder written into "<dir>.tmp-<pid>" by `payload` (its tensors and config) plus the tokenizer
// files and chat template of `options`, fsynced, then swapped into place with one rename.
void save_folder(const std::string& dir, const SaveOptions& options,
                 const std::function<void(const std::string& tmp, const WriteText& write_text)>& payload) {
  namespace fs = std::filesystem;
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  const std::string tmp = clean + ".tmp-" + std::to_string(getpid());
  std::error_code ec;
  fs::remove_all(tmp, ec);
  make_dirs(tmp);

  auto write_text = [&](const std::string& name, const std::string& text) {
    FileCloser fc{fopen((tmp + "/" + name).c_str(), "wb")};
    if (!fc.f) throw Error(tmp + "/" + name + ": cannot create: " + errno_text());
    write_all(fc.f, text.data(), text.size(), tmp + "/" + name);
    if (fflush(fc.f) != 0 || fsync(fileno(fc.f)) != 0) throw Error(tmp + "/" + name + ": flush failed");
  };

  try {
    payload(tmp, write_text);
    const std::string src = options.source_dir;
    if (!src.empty())
      for (const char* f : kTokenizerFiles)
        if (path_exists(src + "/" + f)) write_text(f, read_file(src + "/" + f));
    if (!options.chat_template.empty()) {
      const std::string cfg = src.empty() ? std::string() : src + "/tokenizer_config.json";
      write_text("tokenizer_config.json", with_chat_template(!cfg.empty() && path_exists(cfg) ? read_file(cfg) : "",
                                                             options.chat_template, cfg));
      if (!src.empty() && path_exists(src + "/chat_template.jinja")) write_text("chat_template.jinja", options.chat_template);
    }
    fsync_path(tmp);
  } catch (...) {
    discard_partial_write(tmp, clean);  // a full disk, say: its space comes back now
    throw;
  }

  if (path_exists(clean)) {
    // Swap both names in one step; then the old folder (now at tmp) is removed.
    if (renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, clean.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS) throw Error(clean + ": cannot replace with " + tmp + ": " + errno_text());
      // Filesystems without RENAME_EXCHANGE: move the old folder aside first (a crash in between
      // leaves it at <dir>.old-<pid>).
      const std::string old = clean + ".old-" + std::to_string(getpid());
      fs::remove_all(old, ec);
      fs::rename(clean, old);
      fs::rename(tmp, clean);
      fs::remove_all(old, ec);
    } else {
      fs::remove_all(tmp, ec);
    }
  } else {
    make_dirs(parent_dir(clean));
    if (std::rename(tmp.c_str(), clean.c_str()) != 0)
      throw Error(clean + ": cannot rename " + tmp + " into place: " + errno_text());
  }
  fsync_path(parent_dir(clean));
}
}  // namespace

void save_checkpoint(const std::string& dir, const Qwen2Config& config, const NamedTensors& tensors,
                     const SaveOptions& options) {
  PTK_CHECK(!tensors.empty(), "save_checkpoint(" + dir + "): no tensors to save");
  save_folder(dir, options, [&](const std::string& tmp, const WriteText& write_text) {
    write_sharded_safetensors(tmp, tensors, options.max_shard_bytes);
    Qwen2Config c = config;
    c.torch_dtype = torch_dtype_name(tensors.front().second.scalar_type());
    write_text("config.json", config_to_json(c));
    std::string gen;
    for (const std::string& d : {options.generation_config_dir, options.source_dir})
      if (!d.empty() && path_exists(d + "/generation_config.json")) {
        gen = read_file(d + "/generation_config.json");
        break;
      }
    write_text("generation_config.json", gen.empty() ? default_generation_config_json(c) : gen);
  });
}

void save_adapter_folder(const std::string& dir, const AdapterConfig& config, const NamedTensors& tensors,
                         const SaveOptions& options) {
  PTK_CHECK(!tensors.empty(), "save_adapter_folder(" + dir + "): no tensors to save");
  save_folder(dir, options, [&](const std::string& tmp, const WriteText& write_text) {
    write_safetensors(tmp + "/" + kAdapterWeightsFile, tensors);
    write_text(kAdapterConfigFile, adapter_config_json(config) + "\n");
  });
}

}  // namespace ptk::checkpoint
