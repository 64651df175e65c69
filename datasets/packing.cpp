// Best-fit-decreasing packing (see packing.h). Open rows are bucketed by their free space in an
// ordered map (only free-space values that occur), which finds the tightest fit in O(log rows);
// memory grows with the rows, never with the capacity (a vector indexed by free space took
// 24 bytes x data.max_seq_len: std::bad_alloc at max_seq_len 10^9).
#include "datasets/packing.h"

#include <algorithm>
#include <deque>
#include <map>
#include <numeric>
#include <string>

#include "core/util/error.h"

namespace ptk::data {

std::vector<std::vector<uint32_t>> pack_best_fit_decreasing(const std::vector<uint32_t>& lengths, uint32_t capacity) {
  if (capacity == 0) throw Error("packing: capacity (data.max_seq_len) must be > 0");
  std::vector<uint32_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0u);
  for (uint32_t i : order)
    if (lengths[i] == 0 || lengths[i] > capacity)
      throw Error("packing: document " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
                  " tokens; every document must hold 1.." + std::to_string(capacity));
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<uint32_t>> rows;
  // Free space -> open rows in the order they reached it (never empty). Of equally tight rows the
  // oldest takes the document, as in TRL's bfd (trl.data_utils._pack_bfd's deque, popleft), so the
  // same documents make the same rows; taking the newest (before) packed them differently.
  std::map<uint32_t, std::deque<uint32_t>> by_free;
  for (uint32_t d : order) {
    uint32_t len = lengths[d];
    auto it = by_free.lower_bound(len);
    uint32_t row;
    uint32_t free_now;
    if (it == by_free.end()) {
      row = static_cast<uint32_t>(rows.size());
      rows.emplace_back();
      free_now = capacity;
    } else {
      free_now = it->first;
      row = it->second.front();
      it->second.pop_front();
      if (it->second.empty()) by_free.erase(it);
    }
    rows[row].push_back(d);
    uint32_t left = free_now - len;
    if (left > 0) by_free[left].push_back(row);
  }
  return rows;
}

double padding_fraction(uint64_t tokens, uint64_t rows, uint32_t capacity) {
  if (rows == 0) return 0.0;
  return 1.0 - static_cast<double>(tokens) / (static_cast<double>(rows) * capacity);
}

}  // namespace ptk::data
