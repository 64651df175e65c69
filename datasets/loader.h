// Reading a prepared folder (mmap) and walking it: a seeded permutation of rows per epoch, split
// across ranks, with a JSON cursor for checkpoints; plus the batch builders stages turn into tensors.
// Not LibTorch: batches are plain vectors (the stage makes tensors). Not prepare (prepare.h).
//
// Memory: the files are mapped, never read whole; the permutation is a keyed bijection computed per
// index (no array of row ids), so a loader's memory does not grow with the dataset. Mapped pages
// are handed back (madvise) whenever the resident file pages pass `release_bytes`, so the resident
// set stays flat over an epoch.
// Threading: a PreparedSet is read-only after open (share it between threads); a Loader is one
// owner's. Views (spans, string_views) stay valid while the PreparedSet lives.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "datasets/records.h"  // Format
#include "datasets/shards.h"   // DocEntry

namespace ptk::data {

template <class T>
struct Span {
  const T* data = nullptr;
  size_t size = 0;
  const T& operator[](size_t i) const { return data[i]; }
  const T* begin() const { return data; }
  const T* end() const { return data + size; }
  std::vector<T> to_vector() const { return std::vector<T>(begin(), end()); }
};

// One document as stored: ids and the TRL label mask (1 = target; the loader additionally never
// makes a document's first token a target).
struct DocView {
  Span<uint32_t> ids;
  Span<uint8_t> mask;
  const DocEntry* entry = nullptr;
};

class PreparedSet {
 public:
  // Maps `dir`. Throws ptk::Error when manifest.json is missing (an unfinished or never-run
  // prepare), unreadable, of another version, or a listed file has another size.
  // Mapped pages are released when the process's resident file-backed pages exceed `release_bytes`
  // (checked every 256 document reads; 0 = never).
  static PreparedSet open(const std::string& dir, uint64_t release_bytes = 64ull << 20);
  PreparedSet(PreparedSet&&) noexcept;
  PreparedSet& operator=(PreparedSet&&) noexcept;
  ~PreparedSet();

  const std::string& dir() const;
  Format format() const;
  int64_t max_seq_len() const;
  bool packed() const;                   // sft rows hold several documents
  int64_t num_docs() const;
  int64_t num_rows() const;              // packed: rows of packed docs; else one doc (pair, prompt) a row
  const std::string& manifest() const;   // the manifest text
  std::string fingerprint() const;       // SHA-256 of the manifest's "key" (what the data is)

  DocView doc(int64_t i) const;
  // Documents of row r, in order (unpacked: {r}).
  std::vector<uint32_t> row_docs(int64_t r) const;
  // rl: the record's JSON (answer and extra fields).
  std::string_view meta(int64_t doc) const;
  // Hands mapped pages back to the kernel (contents stay in the page cache; views stay valid).
  void release_pages() const;

 private:
  struct Impl;
  explicit PreparedSet(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A bijection on [0, n) keyed by a seed: a 4-round Feistel network on the next even power of two,
// cycle-walked into range. O(1) memory; same (n, seed) -> same order on every machine.
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t seed);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }

 private:
  uint64_t n_, half_bits_, mask_;
  uint64_t keys_[4];
};

struct LoaderOptions {
  int64_t micro_batch_size = 1;  // rows per micro-batch on each rank
  int rank = 0, world_size = 1;  // torchrun's RANK / WORLD_SIZE
  uint64_t seed = 0;             // run.seed; epoch e uses Permutation(rows, f(seed, e))
  bool shuffle = true;           // false: rows in stored order (eval)
};

// Epoch e is the row permutation P_e; global micro-batch g of an epoch covers permuted positions
// [g·W·B, (g+1)·W·B), rank r the B positions from g·W·B + r·B. Positions past the row count wrap to
// the start of P_e (as torch's DistributedSampler pads), so every rank takes the same number of
// micro-batches and no row is left out. So W ranks × B rows see, step by step, the rows 1 rank ×
// W·B rows sees.
class Loader {
 public:
  Loader(const PreparedSet& set, LoaderOptions options);

  int64_t batches_per_epoch() const;  // ceil(rows / (W·B)), the same on every rank
  // Row ids of this rank's next micro-batch; moves into the next epoch by itself.
  std::vector<int64_t> next_rows();
  int64_t epoch() const { return epoch_; }
  int64_t batch_in_epoch() const { return batch_; }

  // {"epoch":E,"batch":G,"rows":R,"micro_batch_size":B,"world_size":W,"seed":S,"data":"<fingerprint>"}
  std::string cursor_json() const;
  // Restores a cursor; throws ptk::Error when it was written for other data (fingerprint, row
  // count) or another seed; another W·B is accepted when the position converts exactly.
  void restore_cursor(const std::string& json);

  const PreparedSet& set() const { return *set_; }
  const LoaderOptions& options() const { return opt_; }

 private:
  const PreparedSet* set_;
  LoaderOptions opt_;
  int64_t rows_;
  int64_t epoch_ = 0, batch_ = 0;
  std::unique_ptr<Permutation> perm_;
  void start_epoch();
};

// An sft micro-batch, row-major (B, T).
struct SftBatch {
  int64_t rows = 0, seq_len = 0;       // B, T
  std::vector<int32_t> input_ids;      // (B, T); pad_id after each row's tokens
  std::vector<int32_t> positions;      // (B, T); restart at 0 in every document; 0 on padding
  std::vector<uint8_t> loss_mask;      // (B, T); 1 = token t is a target (scored by logits at t-1):
                                       // stored mask, but 0 on every document's first token and padding
  std::vector<std::vector<int64_t>> doc_lengths;  // packed: per row (ForwardInput::doc_lengths); else empty
  std::vector<int64_t> row_lengths;    // (B) real tokens per row (padded: attention_mask = t < row_lengths[b])
  int64_t targets = 0;                 // sum(loss_mask): the step's N adds these
  int64_t tokens = 0;                  // sum(row_lengths)
  // Stored mask ones including documents' first tokens: TRL's N for padded (not padding-free) data
  // counts those (docs/FORMULAS.md §1 caveat); equal to `targets` for chat and prompt/completion data.
  int64_t unshifted_label_count = 0;
};

// Builds the batch of `rows`. Packed sets: T = max_seq_len, documents of a row back to back.
// Unpacked: one document a row, T = the longest in the batch (pad_to_max_seq_len: max_seq_len).
SftBatch make_sft_batch(const PreparedSet& set, const std::vector<int64_t>& rows, int32_t pad_id,
                        bool pad_to_max_seq_len = false);

// A preference pair as stored (views into the mapped files).
struct PairView {
  Span<uint32_t> prompt, chosen, rejected;
  uint32_t source = 0, line = 0;
};
std::vector<PairView> make_preference_batch(const PreparedSet& set, const std::vector<int64_t>& rows);

// An rl prompt: token ids (rendered with the generation prompt for chat), the record's JSON and
// its answer (parsed from that JSON).
struct RlPrompt {
  Span<uint32_t> ids;
  std::string_view record_json;
  std::string answer;
  uint32_t source = 0, line = 0;
};
std::vector<RlPrompt> make_rl_batch(const PreparedSet& set, const std::vector<int64_t>& rows);

}  // namespace ptk::data
