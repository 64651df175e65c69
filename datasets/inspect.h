// What a prepared folder trains on, for people: rows decoded back to text with the loss mask marked
// (`ptk inspect-data`, `ptk prepare --show N`). Reads the folder through PreparedSet; never writes.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>

#include "core/tokenizer/tokenizer.h"
#include "datasets/loader.h"

namespace ptk::data {

struct InspectOptions {
  int64_t rows = 3;     // rows shown (sft: packed rows or documents; preference: pairs; rl: prompts)
  int64_t start = 0;    // first row shown
  bool color = false;   // trained text in ANSI green (a terminal) instead of between kTrainedOpen/Close
  bool tokens = false;  // also mark every token boundary with kTokenSeparator
};

// Marks around trained text without colour, and between tokens with InspectOptions::tokens.
constexpr const char* kTrainedOpen = "[[";
constexpr const char* kTrainedClose = "]]";
constexpr const char* kTokenSeparator = "|";

// Writes a header (folder, format, rows, what marks trained text), then rows [start, start + rows)
// of `set` decoded with `tok`. A token is shown as trained when it is a training target: mask 1,
// except an sft document's first token, which nothing predicts (the loader's rule). sft: each row's
// documents (several when packed) with their source file:line and token counts; preference: the
// prompt (never trained), then chosen and rejected; rl: the prompt (no loss: GRPO trains the
// completions it samples) and the record's other fields. Consecutive tokens of the same kind are
// decoded together (a character split between a trained and an untrained token shows as U+FFFD).
void inspect_rows(const PreparedSet& set, const tokenizer::Tokenizer& tok, const InspectOptions& options,
                  std::ostream& out);

// The tokenizer path manifest.json records (prepare writes it since kPrepareVersion 4), "" if none.
std::string manifest_tokenizer_path(const PreparedSet& set);

}  // namespace ptk::data
