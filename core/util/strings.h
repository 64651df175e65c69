// Small string helpers shared by the config loader and the CLI. Not a text-processing library.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace ptk {

// Levenshtein distance, for "did you mean" suggestions.
size_t edit_distance(std::string_view a, std::string_view b);

// The candidate nearest to `key` (by edit distance on the last path component, then the whole
// path), or "" when nothing is reasonably close.
std::string nearest(std::string_view key, const std::vector<std::string>& candidates);

// The strings of `v` with `sep` between them ("a, b, c").
std::string join(const std::vector<std::string>& v, std::string_view sep);

// "1.23 GiB", "512 B" ...
std::string format_bytes(double bytes);
// "1h02m03s", "4m05s", "12.3s"
std::string format_duration(double seconds);

}  // namespace ptk
