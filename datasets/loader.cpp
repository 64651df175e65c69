// Prepared folders mapped read-only, the Feistel permutation, the rank-split loader with its cursor,
// and the batch builders (see loader.h). Not prepare.
#include "datasets/loader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/prepare.h"  // sha256_hex

namespace ptk::data {

namespace {

// A whole file mapped read-only (an empty file maps to nothing).
class Mapped {
 public:
  Mapped() = default;
  explicit Mapped(const std::string& path) {
    int fd = open_regular_file(path);  // a FIFO in the folder is refused, not waited on
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw Error("cannot stat " + path + ": " + std::strerror(errno));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw Error("cannot map " + path + ": " + std::strerror(errno));
      }
      data_ = static_cast<const char*>(p);
      // Rows are read in a random order: no readahead (and, on recent kernels, no fault-around).
      ::madvise(p, size_, MADV_RANDOM);
    }
    ::close(fd);
  }
  Mapped(Mapped&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  Mapped& operator=(Mapped&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~Mapped() {
    if (data_) ::munmap(const_cast<char*>(data_), size_);
  }
  const char* data() const { return data_; }
  size_t size() const { return size_; }
  void release() const {
    if (data_) ::madvise(const_cast<char*>(data_), size_, MADV_DONTNEED);
  }

 private:
  const char* data_ = nullptr;
  size_t size_ = 0;
};

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

struct PreparedSet::Impl {
  std::string dir, manifest, fingerprint;
  Format format = Format::kSft;
  int64_t max_seq_len = 0, docs = 0, rows = 0;
  bool packed = false;
  std::vector<Mapped> tokens, masks;
  Mapped doc_index, meta, row_idx, row_docs;
  uint64_t release_bytes = 64ull << 20;
  mutable std::atomic<uint64_t> touched{0};

  const DocEntry& entry(int64_t i) const { return reinterpret_cast<const DocEntry*>(doc_index.data())[i]; }
  // Called on every document read. Every 16 reads, looks at the process's resident file-backed
  // pages (/proc/self/statm "shared") and hands the mappings back when they exceed release_bytes:
  // measured rather than estimated, because a fault can map far more than is read (fault-around,
  // and page-cache folios of up to 2 MiB on recent kernels: ~1.8 MiB per random document measured).
  void touch() const {
    if (release_bytes == 0 || (touched.fetch_add(1) & 15) != 0) return;
    if (resident_file_bytes() > release_bytes) release_all();
  }
  uint64_t resident_file_bytes() const {
    if (statm_fd < 0) return 0;
    char buf[128];
    ssize_t n = ::pread(statm_fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    buf[n] = 0;
    unsigned long long size = 0, resident = 0, shared = 0;
    if (std::sscanf(buf, "%llu %llu %llu", &size, &resident, &shared) != 3) return 0;
    return shared * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  }
  int statm_fd = ::open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  ~Impl() {
    if (statm_fd >= 0) ::close(statm_fd);
  }
  void release_all() const {
    for (const auto& m : tokens) m.release();
    for (const auto& m : masks) m.release();
    doc_index.release();
    meta.release();
    row_idx.release();
    row_docs.release();
  }
};

PreparedSet::PreparedSet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PreparedSet::PreparedSet(PreparedSet&&) noexcept = default;
PreparedSet& PreparedSet::operator=(PreparedSet&&) noexcept = default;
PreparedSet::~PreparedSet() = default;

PreparedSet PreparedSet::open(const std::string& dir, uint64_t release_bytes) {
  const std::string mpath = dir + "/manifest.json";
  if (!path_exists(mpath))
    throw Error("prepared data: " + mpath + " is missing (prepare never finished there)\n---> HINT: run `ptk prepare` "
                "(stages do it by themselves when data.train is set)");
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->release_bytes = release_bytes;
  impl->manifest = read_file(mpath);
  rapidjson::Document m = json::parse(impl->manifest, mpath);
  auto bad = [&](const std::string& what) {
    return Error("prepared data: " + mpath + ": " + what + "\n---> HINT: run `ptk prepare --force` to rebuild the folder");
  };
  if (!m.IsObject() || !m.HasMember("ptk_prepared") || !m["ptk_prepared"].IsInt()) throw bad("not a ptk manifest");
  if (m["ptk_prepared"].GetInt() != kPrepareVersion)
    throw bad("written by prepare version " + std::to_string(m["ptk_prepared"].GetInt()) + ", this build reads " +
              std::to_string(kPrepareVersion));
  const auto& key = m["key"];
  impl->format = parse_format(m["format"].GetString());
  impl->max_seq_len = key["max_seq_len"].GetInt64();
  impl->packed = key["packing"].GetBool();
  impl->docs = m["counts"]["docs"].GetInt64();
  impl->rows = m["counts"]["rows"].GetInt64();
  std::string key_text = json::to_string(key);
  impl->fingerprint = sha256_hex(key_text.data(), key_text.size());
  const auto& files = m["files"];
  for (auto it = files.MemberBegin(); it != files.MemberEnd(); ++it) {
    struct stat st {};
    std::string f = dir + "/" + it->name.GetString();
    if (::stat(f.c_str(), &st) != 0) throw bad(std::string(it->name.GetString()) + " is missing");
    if (static_cast<uint64_t>(st.st_size) != it->value.GetUint64())
      throw bad(std::string(it->name.GetString()) + " has " + std::to_string(st.st_size) + " bytes, the manifest says " +
                std::to_string(it->value.GetUint64()));
  }
  const auto& shards = m["shards"];
  for (rapidjson::SizeType s = 0; s < shards.Size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "/tokens-%05u.u32", s);
    impl->tokens.emplace_back(dir + name);
    std::snprintf(name, sizeof name, "/mask-%05u.u8", s);
    impl->masks.emplace_back(dir + name);
    if (impl->tokens.back().size() != shards[s].GetUint64() * 4 || impl->masks.back().size() != shards[s].GetUint64())
      throw bad("shard " + std::to_string(s) + " does not hold the " + std::to_string(shards[s].GetUint64()) + " tokens listed");
  }
  impl->doc_index = Mapped(dir + "/docs.idx");
  if (impl->doc_index.size() != static_cast<size_t>(impl->docs) * sizeof(DocEntry)) throw bad("docs.idx size does not match counts.docs");
  if (impl->format == Format::kRl) impl->meta = Mapped(dir + "/meta.bin");
  if (impl->packed) {
    impl->row_idx = Mapped(dir + "/rows.idx");
    impl->row_docs = Mapped(dir + "/rows.docs");
    if (impl->row_idx.size() != static_cast<size_t>(impl->rows + 1) * sizeof(uint64_t)) throw bad("rows.idx size does not match counts.rows");
  }
  return PreparedSet(std::move(impl));
}

const std::string& PreparedSet::dir() const { return impl_->dir; }
Format PreparedSet::format() const { return impl_->format; }
int64_t PreparedSet::max_seq_len() const { return impl_->max_seq_len; }
bool PreparedSet::packed() const { return impl_->packed; }
int64_t PreparedSet::num_docs() const { return impl_->docs; }
int64_t PreparedSet::num_rows() const { return impl_->rows; }
const std::string& PreparedSet::manifest() const { return impl_->manifest; }
std::string PreparedSet::fingerprint() const { return impl_->fingerprint; }

DocView PreparedSet::doc(int64_t i) const {
  if (i < 0 || i >= impl_->docs) throw Error("prepared data: document " + std::to_string(i) + " out of range");
  const DocEntry& e = impl_->entry(i);
  DocView v;
  v.entry = &e;
  v.ids = {reinterpret_cast<const uint32_t*>(impl_->tokens[e.shard].data()) + e.offset, e.length};
  v.mask = {reinterpret_cast<const uint8_t*>(impl_->masks[e.shard].data()) + e.offset, e.length};
  impl_->touch();
  return v;
}

std::vector<uint32_t> PreparedSet::row_docs(int64_t r) const {
  if (r < 0 || r >= impl_->rows) throw Error("prepared data: row " + std::to_string(r) + " out of range");
  if (!impl_->packed) return {static_cast<uint32_t>(r)};
  const auto* off = reinterpret_cast<const uint64_t*>(impl_->row_idx.data());
  const auto* ids = reinterpret_cast<const uint32_t*>(impl_->row_docs.data());
  return std::vector<uint32_t>(ids + off[r], ids + off[r + 1]);
}

std::string_view PreparedSet::meta(int64_t i) const {
  const DocEntry& e = impl_->entry(i);
  if (impl_->format != Format::kRl) return {};
  return std::string_view(impl_->meta.data() + e.meta_offset, e.meta_len);
}

void PreparedSet::release_pages() const { impl_->release_all(); }

// ---- permutation -------------------------------------------------------------------------------

Permutation::Permutation(uint64_t n, uint64_t seed) : n_(n) {
  uint64_t bits = 2;
  while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
  if (bits % 2) ++bits;
  half_bits_ = bits / 2;
  mask_ = (uint64_t{1} << half_bits_) - 1;
  uint64_t k = seed;
  for (auto& key : keys_) key = k = splitmix64(k);
}

uint64_t Permutation::operator()(uint64_t i) const {
  if (i >= n_) throw Error("permutation index " + std::to_string(i) + " out of range " + std::to_string(n_));
  uint64_t x = i;
  do {
    uint64_t l = x >> half_bits_, r = x & mask_;
    for (uint64_t key : keys_) {
      uint64_t f = splitmix64(r ^ key) & mask_;
      uint64_t nl = r;
      r = l ^ f;
      l = nl;
    }
    x = (l << half_bits_) | r;
  } while (x >= n_);  // cycle-walk: the domain is < 4n, so a few rounds at most on average
  return x;
}

// ---- loader ------------------------------------------------------------------------------------

Loader::Loader(const PreparedSet& set, LoaderOptions options) : set_(&set), opt_(options), rows_(set.num_rows()) {
  if (opt_.micro_batch_size < 1) throw Error("loader: train.micro_batch_size must be >= 1, got " + std::to_string(opt_.micro_batch_size));
  if (opt_.world_size < 1 || opt_.rank < 0 || opt_.rank >= opt_.world_size)
    throw Error("loader: rank " + std::to_string(opt_.rank) + " is not in [0, world_size " + std::to_string(opt_.world_size) + ")");
  if (rows_ < 1) throw Error("loader: " + set.dir() + " holds no rows");
  start_epoch();
}

void Loader::start_epoch() {
  perm_ = std::make_unique<Permutation>(static_cast<uint64_t>(rows_), splitmix64(opt_.seed ^ splitmix64(static_cast<uint64_t>(epoch_) + 1)));
}

int64_t Loader::batches_per_epoch() const {
  int64_t global = opt_.micro_batch_size * opt_.world_size;
  return (rows_ + global - 1) / global;
}

std::vector<int64_t> Loader::next_rows() {
  if (batch_ >= batches_per_epoch()) {
    ++epoch_;
    batch_ = 0;
    start_epoch();
  }
  std::vector<int64_t> out(static_cast<size_t>(opt_.micro_batch_size));
  int64_t base = batch_ * opt_.micro_batch_size * opt_.world_size + opt_.rank * opt_.micro_batch_size;
  for (int64_t j = 0; j < opt_.micro_batch_size; ++j) {
    int64_t pos = (base + j) % rows_;  // past the end: wrap to the epoch's start
    out[j] = opt_.shuffle ? static_cast<int64_t>((*perm_)(static_cast<uint64_t>(pos))) : pos;
  }
  ++batch_;
  return out;
}

std::string Loader::cursor_json() const {
  return "{\"epoch\":" + std::to_string(epoch_) + ",\"batch\":" + std::to_string(batch_) + ",\"rows\":" +
         std::to_string(rows_) + ",\"micro_batch_size\":" + std::to_string(opt_.micro_batch_size) +
         ",\"world_size\":" + std::to_string(opt_.world_size) + ",\"seed\":" + std::to_string(opt_.seed) +
         ",\"shuffle\":" + (opt_.shuffle ? "true" : "false") + ",\"data\":\"" + set_->fingerprint() + "\"}";
}

void Loader::restore_cursor(const std::string& text) {
  rapidjson::Document d = json::parse(text, "data cursor");
  auto num = [&](const char* k) -> int64_t {
    if (!d.IsObject() || !d.HasMember(k) || !d[k].IsInt64()) throw Error(std::string("data cursor: missing integer \"") + k + "\" in " + text);
    return d[k].GetInt64();
  };
  if (!d.HasMember("data") || !d["data"].IsString() || d["data"].GetString() != set_->fingerprint())
    throw Error("data cursor: the checkpoint was written for other prepared data (" + set_->dir() +
                " changed since)\n---> HINT: resume with the data it was trained on, or start fresh with resume=never");
  if (num("rows") != rows_) throw Error("data cursor: written for " + std::to_string(num("rows")) + " rows, the data has " + std::to_string(rows_));
  if (static_cast<uint64_t>(d["seed"].GetUint64()) != opt_.seed)
    throw Error("data cursor: written with run.seed " + std::to_string(d["seed"].GetUint64()) + ", this run uses " + std::to_string(opt_.seed));
  int64_t old_global = num("micro_batch_size") * num("world_size");
  int64_t global = opt_.micro_batch_size * opt_.world_size;
  int64_t consumed = num("batch") * old_global;
  if (consumed % global != 0)
    throw Error("data cursor: " + std::to_string(consumed) + " rows of epoch " + std::to_string(num("epoch")) +
                " were consumed with micro_batch_size x world_size = " + std::to_string(old_global) +
                ", which is not a whole number of batches of " + std::to_string(global) +
                "\n---> HINT: resume with a micro_batch_size x world_size that divides it");
  epoch_ = num("epoch");
  batch_ = consumed / global;
  start_epoch();
}

// ---- batches -----------------------------------------------------------------------------------

SftBatch make_sft_batch(const PreparedSet& set, const std::vector<int64_t>& rows, int32_t pad_id, bool pad_to_max_seq_len) {
  if (set.format() != Format::kSft) throw Error(std::string("make_sft_batch: ") + set.dir() + " holds " + format_name(set.format()) + " data");
  SftBatch b;
  b.rows = static_cast<int64_t>(rows.size());
  std::vector<std::vector<uint32_t>> row_docs(rows.size());
  int64_t longest = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    row_docs[i] = set.row_docs(rows[i]);
    int64_t n = 0;
    for (uint32_t d : row_docs[i]) n += set.doc(d).ids.size;
    b.row_lengths.push_back(n);
    longest = std::max(longest, n);
  }
  b.seq_len = set.packed() || pad_to_max_seq_len ? set.max_seq_len() : longest;
  const size_t T = static_cast<size_t>(b.seq_len);
  b.input_ids.assign(rows.size() * T, pad_id);
  b.positions.assign(rows.size() * T, 0);
  b.loss_mask.assign(rows.size() * T, 0);
  if (set.packed()) b.doc_lengths.resize(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    size_t t = i * T;
    for (uint32_t d : row_docs[i]) {
      DocView v = set.doc(d);
      for (size_t k = 0; k < v.ids.size; ++k, ++t) {
        b.input_ids[t] = static_cast<int32_t>(v.ids[k]);
        b.positions[t] = static_cast<int32_t>(k);
        b.loss_mask[t] = k == 0 ? 0 : v.mask[k];
        b.targets += b.loss_mask[t];
        b.unshifted_label_count += v.mask[k];
      }
      if (set.packed()) b.doc_lengths[i].push_back(static_cast<int64_t>(v.ids.size));
    }
    b.tokens += b.row_lengths[i];
  }
  return b;
}

std::vector<PairView> make_preference_batch(const PreparedSet& set, const std::vector<int64_t>& rows) {
  if (set.format() != Format::kPreference)
    throw Error(std::string("make_preference_batch: ") + set.dir() + " holds " + format_name(set.format()) + " data");
  std::vector<PairView> out;
  for (int64_t r : rows) {
    DocView v = set.doc(r);
    const DocEntry& e = *v.entry;
    PairView p;
    p.prompt = {v.ids.data, e.seg_a};
    p.chosen = {v.ids.data + e.seg_a, e.seg_b};
    p.rejected = {v.ids.data + e.seg_a + e.seg_b, e.length - e.seg_a - e.seg_b};
    p.source = e.source;
    p.line = e.line;
    out.push_back(p);
  }
  return out;
}

std::vector<RlPrompt> make_rl_batch(const PreparedSet& set, const std::vector<int64_t>& rows) {
  if (set.format() != Format::kRl) throw Error(std::string("make_rl_batch: ") + set.dir() + " holds " + format_name(set.format()) + " data");
  std::vector<RlPrompt> out;
  for (int64_t r : rows) {
    DocView v = set.doc(r);
    RlPrompt p;
    p.ids = v.ids;
    p.record_json = set.meta(r);
    rapidjson::Document d;
    if (json::parse_into(d, p.record_json).ok() && d.IsObject() && d.HasMember("answer"))
      p.answer = d["answer"].IsString() ? std::string(d["answer"].GetString(), d["answer"].GetStringLength()) : json::to_string(d["answer"]);
    p.source = v.entry->source;
    p.line = v.entry->line;
    out.push_back(std::move(p));
  }
  return out;
}

}  // namespace ptk::data
