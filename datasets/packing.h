// Packing documents into rows of a fixed token budget (best-fit decreasing), and the padding that
// leaves. Not batching: the loader turns rows into batches (loader.h).
#pragma once
#include <cstdint>
#include <vector>

namespace ptk::data {

// Rows as lists of document indices. Documents are placed longest first (ties: lower index
// first) into the fullest row they still fit, the oldest of equally full ones (best-fit
// decreasing, which never uses more rows than first-fit decreasing's 11/9·OPT + 6/9 bound; the
// same rows as TRL's packing_strategy="bfd"); rows come out in order of creation, and the
// documents inside a row in placement order. Every length must be in [1, capacity]; throws
// ptk::Error otherwise. Deterministic; O(n log n) time, O(n) memory.
std::vector<std::vector<uint32_t>> pack_best_fit_decreasing(const std::vector<uint32_t>& lengths, uint32_t capacity);

// 1 - tokens / (rows * capacity); 0 for no rows.
double padding_fraction(uint64_t tokens, uint64_t rows, uint32_t capacity);

}  // namespace ptk::data
