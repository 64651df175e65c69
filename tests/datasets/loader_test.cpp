// Packing invariants (every document once, rows within capacity, no worse than first-fit
// decreasing), the keyed permutation, the loader's epochs, rank split and resumable cursor, and the
// sft batch layout (positions restart per document, a document's first token is never a target).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "core/util/error.h"
#include "datasets/byte_tokenizer.h"
#include "datasets/loader.h"
#include "datasets/packing.h"
#include "datasets/prepare.h"
#include "tests/support/test_util.h"

namespace ptk::data {
namespace {

// First-fit decreasing, the reference the issue names.
size_t ffd_rows(std::vector<uint32_t> lengths, uint32_t cap) {
  std::sort(lengths.rbegin(), lengths.rend());
  std::vector<uint32_t> free;
  for (uint32_t l : lengths) {
    auto it = std::find_if(free.begin(), free.end(), [&](uint32_t f) { return f >= l; });
    if (it == free.end()) {
      free.push_back(cap - l);
    } else {
      *it -= l;
    }
  }
  return free.size();
}

TEST(Packing, InvariantsOnRandomLengths) {
  std::mt19937 rng(3);
  for (uint32_t cap : {16u, 100u, 2048u}) {
    std::vector<uint32_t> len(3000);
    for (auto& l : len) l = 1 + rng() % std::min<uint32_t>(cap, 700);
    auto rows = pack_best_fit_decreasing(len, cap);
    std::vector<int> seen(len.size(), 0);
    uint64_t total = 0;
    for (const auto& r : rows) {
      uint64_t sum = 0;
      for (uint32_t d : r) {
        ++seen[d];
        sum += len[d];
      }
      EXPECT_LE(sum, cap);
      EXPECT_FALSE(r.empty());
      total += sum;
    }
    for (int s : seen) EXPECT_EQ(s, 1);
    uint64_t lower = (total + cap - 1) / cap;
    EXPECT_GE(rows.size(), lower);
    EXPECT_LE(rows.size(), ffd_rows(len, cap)) << "cap " << cap;
    EXPECT_EQ(pack_best_fit_decreasing(len, cap), rows);  // deterministic
  }
}

TEST(Packing, SmallCaseByHand) {
  // Decreasing: 6(d1) 5(d3) 4(d0) 3(d4) 2(d2); capacity 10.
  // 6 -> row0 (free 4); 5 -> row1 (free 5); 4 -> tightest fit row0 (free 0); 3 -> row1 (free 2); 2 -> row1 (free 0).
  auto rows = pack_best_fit_decreasing({4, 6, 2, 5, 3}, 10);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0], (std::vector<uint32_t>{1, 0}));
  EXPECT_EQ(rows[1], (std::vector<uint32_t>{3, 4, 2}));
  EXPECT_DOUBLE_EQ(padding_fraction(20, 2, 10), 0.0);
  EXPECT_DOUBLE_EQ(padding_fraction(15, 2, 10), 0.25);
  EXPECT_THROW(pack_best_fit_decreasing({11}, 10), Error);
  EXPECT_THROW(pack_best_fit_decreasing({0}, 10), Error);
}

// Of two rows with the same room, the older one takes the document (TRL's bfd does the same; the
// newest did before, and the same data packed into other rows than TRL's).
TEST(Packing, TiesGoToTheOldestRow) {
  // Decreasing: 6(d0) 6(d1) 4(d2) 4(d3); capacity 10. d0 -> row0 (free 4); d1 -> row1 (free 4);
  // d2 -> rows 0 and 1 fit equally: row0; d3 -> row1.
  auto rows = pack_best_fit_decreasing({6, 6, 4, 4}, 10);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0], (std::vector<uint32_t>{0, 2}));
  EXPECT_EQ(rows[1], (std::vector<uint32_t>{1, 3}));
}

// issue 24: packing's memory grows with the documents, not the capacity (a table indexed by free
// space took 24 bytes x data.max_seq_len: std::bad_alloc at 10^9; at 4 x 10^9 it would ask 96 GB).
TEST(Packing, HugeCapacityCostsNoMemory) {
  auto rows = pack_best_fit_decreasing({5, 3, 7, 4000000000u - 15}, 4000000000u);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0], (std::vector<uint32_t>{3, 2, 0, 1}));
}

TEST(Permutation, BijectionSeededAndOrderless) {
  for (uint64_t n : {1ull, 2ull, 3ull, 17ull, 1000ull, 4097ull}) {
    Permutation p(n, 42);
    std::set<uint64_t> out;
    for (uint64_t i = 0; i < n; ++i) out.insert(p(i));
    EXPECT_EQ(out.size(), n);
    EXPECT_EQ(*out.rbegin(), n - 1);
  }
  Permutation a(1000, 1), b(1000, 1), c(1000, 2);
  int same = 0, fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    EXPECT_EQ(a(i), b(i));
    same += a(i) == c(i);
    fixed += a(i) == i;
  }
  EXPECT_LT(same, 20);
  EXPECT_LT(fixed, 20);
  EXPECT_THROW(a(1000), Error);
}

struct Data {
  test::TempDir dir;
  std::string out;
  explicit Data(int n, bool packing = true, int64_t max_seq_len = 32) {
    tasks::write_byte_tokenizer(dir.file("tok"));
    std::string text;
    for (int i = 0; i < n; ++i) text += "{\"text\":\"" + std::string(1 + (i * 7) % 20, 'a' + i % 26) + "\"}\n";
    PrepareOptions o;
    o.sources = {{dir.write("d.jsonl", text), 1.0}};
    o.tokenizer_path = dir.file("tok");
    o.max_seq_len = max_seq_len;
    o.packing = packing;
    o.quiet = true;
    out = dir.file("out");
    prepare(o, out);
  }
};

TEST(Loader, EpochsCoverEveryRowInAFreshOrder) {
  Data d(50, false);
  auto set = PreparedSet::open(d.out);
  ASSERT_EQ(set.num_rows(), 50);
  Loader l(set, {/*micro_batch_size=*/5, 0, 1, /*seed=*/9});
  EXPECT_EQ(l.batches_per_epoch(), 10);
  std::vector<int64_t> e0, e1;
  for (int b = 0; b < 10; ++b)
    for (int64_t r : l.next_rows()) e0.push_back(r);
  for (int b = 0; b < 10; ++b)
    for (int64_t r : l.next_rows()) e1.push_back(r);
  EXPECT_EQ(l.epoch(), 1);
  auto s0 = e0, s1 = e1;
  std::sort(s0.begin(), s0.end());
  std::sort(s1.begin(), s1.end());
  std::vector<int64_t> all(50);
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(s0, all);
  EXPECT_EQ(s1, all);
  EXPECT_NE(e0, e1);
  Loader same(set, {5, 0, 1, 9});
  EXPECT_EQ(same.next_rows(), std::vector<int64_t>(e0.begin(), e0.begin() + 5));
  Loader ordered(set, {5, 0, 1, 9, /*shuffle=*/false});
  EXPECT_EQ(ordered.next_rows(), (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

TEST(Loader, RankSplitEqualsOneRankWithTheWholeBatch) {
  Data d(23, false);
  auto set = PreparedSet::open(d.out);
  Loader one(set, {6, 0, 1, 4});
  Loader r0(set, {3, 0, 2, 4}), r1(set, {3, 1, 2, 4});
  EXPECT_EQ(one.batches_per_epoch(), 4);  // ceil(23 / 6): the last batch wraps to the epoch's start
  EXPECT_EQ(r0.batches_per_epoch(), 4);
  std::multiset<int64_t> epoch;
  for (int b = 0; b < 4; ++b) {
    auto a = r0.next_rows(), c = r1.next_rows();
    a.insert(a.end(), c.begin(), c.end());
    EXPECT_EQ(a, one.next_rows()) << "batch " << b;
    epoch.insert(a.begin(), a.end());
  }
  std::set<int64_t> distinct(epoch.begin(), epoch.end());
  EXPECT_EQ(distinct.size(), 23u);  // every row; one wrapped
  EXPECT_EQ(epoch.size(), 24u);
  EXPECT_THROW(Loader(set, {1, 2, 2, 0}), Error);
}

TEST(Loader, CursorResumesExactly) {
  Data d(40);
  auto set = PreparedSet::open(d.out);
  Loader full(set, {2, 0, 1, 11});
  std::vector<std::vector<int64_t>> ref;
  for (int i = 0; i < 3 * full.batches_per_epoch() + 1; ++i) ref.push_back(full.next_rows());
  for (int stop : {0, 1, 5, static_cast<int>(full.batches_per_epoch()), static_cast<int>(full.batches_per_epoch()) + 3}) {
    Loader a(set, {2, 0, 1, 11});
    for (int i = 0; i < stop; ++i) a.next_rows();
    std::string cursor = a.cursor_json();
    Loader b(set, {2, 0, 1, 11});
    b.restore_cursor(cursor);
    for (size_t i = stop; i < ref.size(); ++i) ASSERT_EQ(b.next_rows(), ref[i]) << "stop " << stop << " batch " << i;
  }
  // Another seed or other data is refused; another batch shape converts when it divides.
  Loader a(set, {2, 0, 1, 11});
  for (int i = 0; i < 4; ++i) a.next_rows();
  Loader wrong_seed(set, {2, 0, 1, 12});
  EXPECT_THROW(wrong_seed.restore_cursor(a.cursor_json()), Error);
  Loader wider(set, {4, 0, 1, 11});
  wider.restore_cursor(a.cursor_json());
  EXPECT_EQ(wider.batch_in_epoch(), 2);
  Loader odd(set, {3, 0, 1, 11});
  EXPECT_THROW(odd.restore_cursor(a.cursor_json()), Error);
  Data other(41);
  auto other_set = PreparedSet::open(other.out);
  Loader o(other_set, {2, 0, 1, 11});
  try {
    o.restore_cursor(a.cursor_json());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("written for other prepared data"), std::string::npos) << e.what();
  }
}

TEST(Loader, PackedBatchLayout) {
  Data d(60, true, 32);
  auto set = PreparedSet::open(d.out);
  ASSERT_TRUE(set.packed());
  EXPECT_LT(set.num_rows(), set.num_docs());
  std::vector<int64_t> rows(set.num_rows());
  std::iota(rows.begin(), rows.end(), 0);
  SftBatch b = make_sft_batch(set, rows, /*pad_id=*/256);
  EXPECT_EQ(b.seq_len, 32);
  int64_t docs = 0, targets = 0;
  for (int64_t r = 0; r < b.rows; ++r) {
    int64_t t = r * 32, sum = 0;
    for (int64_t len : b.doc_lengths[r]) {
      ++docs;
      for (int64_t k = 0; k < len; ++k, ++t) {
        EXPECT_EQ(b.positions[t], k);                 // positions restart per document
        if (k == 0) {
          EXPECT_EQ(b.loss_mask[t], 0);  // first token never a target
        }
        targets += b.loss_mask[t];
      }
      sum += len;
    }
    EXPECT_EQ(sum, b.row_lengths[r]);
    EXPECT_LE(sum, 32);
    for (; t < (r + 1) * 32; ++t) {
      EXPECT_EQ(b.input_ids[t], 256);
      EXPECT_EQ(b.loss_mask[t], 0);
    }
  }
  EXPECT_EQ(docs, set.num_docs());
  EXPECT_EQ(targets, b.targets);
  // Text data: every stored label is 1, so TRL's unshifted count exceeds targets by one per document.
  EXPECT_EQ(b.unshifted_label_count, b.targets + docs);
}

TEST(Loader, PaddedBatchLayout) {
  Data d(10, false, 32);
  auto set = PreparedSet::open(d.out);
  SftBatch b = make_sft_batch(set, {0, 1}, 256);
  EXPECT_TRUE(b.doc_lengths.empty());
  EXPECT_EQ(b.seq_len, std::max(b.row_lengths[0], b.row_lengths[1]));
  EXPECT_EQ(make_sft_batch(set, {0, 1}, 256, true).seq_len, 32);
  EXPECT_EQ(b.positions[1], 1);
  EXPECT_EQ(b.loss_mask[0], 0);
  EXPECT_EQ(b.tokens, b.row_lengths[0] + b.row_lengths[1]);
}

}  // namespace
}  // namespace ptk::data
