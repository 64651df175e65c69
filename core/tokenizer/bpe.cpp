// Byte-level BPE merging, equal to HF's BPE::merge_word (lowest rank first, leftmost on ties),
// with a per-thread word cache. Not the loader (tokenizer.cpp) and not pre-tokenization.
#include <absl/container/flat_hash_map.h>
#include <absl/strings/string_view.h>

#include <algorithm>
#include <queue>

#include "core/tokenizer/tokenizer_impl.h"
#include "core/tokenizer/unicode.h"

namespace ptk::tokenizer {

namespace {

struct WordCache {
  uint64_t owner = 0;
  absl::flat_hash_map<std::string, std::pair<uint32_t, uint32_t>> map;  // word -> [offset, count) in arena
  std::vector<TokenId> arena;
  void reset(uint64_t uid) {
    owner = uid;
    map.clear();
    arena.clear();
  }
};
constexpr size_t kMaxCachedWord = 64;
constexpr size_t kMaxCacheEntries = 1 << 17;

WordCache& cache_for(uint64_t uid) {
  thread_local WordCache c;
  if (c.owner != uid || c.map.size() >= kMaxCacheEntries) c.reset(uid);
  return c;
}

inline bool lookup_merge(const BpeModel& m, TokenId a, TokenId b, uint32_t* rank, TokenId* merged) {
  auto it = m.merges.find((static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b));
  if (it == m.merges.end()) return false;
  *rank = static_cast<uint32_t>(it->second >> 32);
  *merged = static_cast<TokenId>(it->second & 0xFFFFFFFFu);
  return true;
}

// Symbols of the word before merging: one per byte (its alphabet character), unknown bytes become
// unk (fused when asked) or are dropped, as HF does.
void initial_symbols(const BpeModel& m, std::string_view word, std::vector<TokenId>* syms) {
  syms->clear();
  for (unsigned char b : word) {
    TokenId id = m.byte_id[b];
    if (id == kNoToken) {
      if (m.unk == kNoToken) continue;
      if (m.fuse_unk && !syms->empty() && syms->back() == m.unk) continue;
      id = m.unk;
    }
    syms->push_back(id);
  }
}

// Few symbols: rescan for the lowest-rank pair each round (cheap and cache-friendly).
void merge_small(const BpeModel& m, std::vector<TokenId>* s) {
  for (;;) {
    uint32_t best_rank = UINT32_MAX, r;
    size_t best = 0;
    TokenId best_id = 0, id;
    for (size_t i = 0; i + 1 < s->size(); ++i) {
      if (lookup_merge(m, (*s)[i], (*s)[i + 1], &r, &id) && r < best_rank) {
        best_rank = r;
        best = i;
        best_id = id;
      }
    }
    if (best_rank == UINT32_MAX) return;
    (*s)[best] = best_id;
    s->erase(s->begin() + static_cast<ptrdiff_t>(best) + 1);
  }
}

// Many symbols: HF's algorithm, a heap of (rank, position) over a linked list of symbols.
void merge_large(const BpeModel& m, std::vector<TokenId>* s) {
  size_t n = s->size();
  std::vector<TokenId> id(*s);
  std::vector<int> prev(n), next(n);
  std::vector<uint8_t> alive(n, 1);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int>(i + 1) : -1;
  }
  struct Item {
    uint32_t rank;
    int pos;
    TokenId left, right;  // the pair when pushed, to detect stale entries
    bool operator>(const Item& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
  uint32_t r;
  TokenId mid;
  for (size_t i = 0; i + 1 < n; ++i)
    if (lookup_merge(m, id[i], id[i + 1], &r, &mid)) heap.push({r, static_cast<int>(i), id[i], id[i + 1]});
  while (!heap.empty()) {
    Item it = heap.top();
    heap.pop();
    int i = it.pos;
    if (!alive[i] || id[i] != it.left) continue;
    int j = next[i];
    if (j < 0 || id[j] != it.right) continue;
    if (!lookup_merge(m, id[i], id[j], &r, &mid) || r != it.rank) continue;
    id[i] = mid;
    alive[j] = 0;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    if (prev[i] >= 0 && lookup_merge(m, id[prev[i]], id[i], &r, &mid)) heap.push({r, prev[i], id[prev[i]], id[i]});
    if (next[i] >= 0 && lookup_merge(m, id[i], id[next[i]], &r, &mid)) heap.push({r, i, id[i], id[next[i]]});
  }
  s->clear();
  for (int i = 0; i >= 0; i = next[i]) s->push_back(id[i]);
}

void merge_word_uncached(const BpeModel& m, std::string_view word, std::vector<TokenId>* out) {
  if (m.ignore_merges) {
    std::string mapped;
    for (unsigned char b : word) unicode::append(&mapped, unicode::byte_to_cp(b));
    auto it = m.vocab.find(mapped);
    if (it != m.vocab.end()) {
      out->push_back(it->second);
      return;
    }
  }
  thread_local std::vector<TokenId> syms;
  initial_symbols(m, word, &syms);
  if (syms.size() <= 48) {
    merge_small(m, &syms);
  } else {
    merge_large(m, &syms);
  }
  out->insert(out->end(), syms.begin(), syms.end());
}

}  // namespace

void BpeModel::encode_word(std::string_view word, uint64_t cache_uid, std::vector<TokenId>* out) const {
  if (word.size() == 1 && !ignore_merges) {
    TokenId id = byte_id[static_cast<unsigned char>(word[0])];
    if (id != kNoToken) {
      out->push_back(id);
      return;
    }
  }
  if (word.size() > kMaxCachedWord) {
    merge_word_uncached(*this, word, out);
    return;
  }
  WordCache& c = cache_for(cache_uid);
  auto it = c.map.find(absl::string_view(word.data(), word.size()));
  if (it != c.map.end()) {
    out->insert(out->end(), c.arena.begin() + it->second.first,
                c.arena.begin() + it->second.first + it->second.second);
    return;
  }
  size_t before = out->size();
  merge_word_uncached(*this, word, out);
  uint32_t off = static_cast<uint32_t>(c.arena.size());
  c.arena.insert(c.arena.end(), out->begin() + static_cast<ptrdiff_t>(before), out->end());
  c.map.emplace(std::string(word), std::make_pair(off, static_cast<uint32_t>(out->size() - before)));
}

}  // namespace ptk::tokenizer
