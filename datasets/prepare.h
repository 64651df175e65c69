// `prepare`: JSONL sources -> tokenized, masked, packed shards in one folder (layout: shards.h), and
// the freshness check that lets stages call it on every start. Not the loader (loader.h).
//
// Crash safety: everything is written into "<dir>.tmp-<pid>/", manifest.json last, then the folder
// is renamed over <dir>; a crash leaves the previous folder (or none), never a half folder that a
// loader accepts. Determinism: the same sources, tokenizer and options give identical bytes,
// whatever the thread count. Memory: a record costs its line plus what max_seq_len keeps, not its
// size times the tokenizer's overhead: each text is encoded only as far as truncation can keep
// (Tokenizer::head_bytes), a prompt cut from the left keeps only its last ids as it goes
// (Tokenizer::encode_tail); the result is the same as encoding it whole, then truncating.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config/options.h"  // DataSource
#include "core/config/sections.h"  // DataSection, TokenizerSection, ModelSection
#include "datasets/records.h"     // Format

namespace ptk::data {

struct PrepareOptions {
  Format format = Format::kSft;
  std::vector<config::DataSource> sources;  // files or globs with mixing weights
  std::string sources_key = "data.train";   // names the sources in errors
  std::string tokenizer_path;               // folder with tokenizer.json, or the file
  std::string chat_template = "auto";       // auto | qwen2.5 | chatml | a .jinja file | inline Jinja
  std::string chat_template_kwargs;         // JSON object of extra template variables ("" = none)
  int64_t max_seq_len = 2048;               // tokens per row (sft), per prompt+reply (preference), per prompt (rl)
  bool packing = true;                      // sft: pack documents into rows; else one document per row
  std::string on_error = "fail";            // fail | skip
  // Records longer than max_seq_len: "truncate" (sft: keep the first max_seq_len tokens; preference:
  // shorten the prompt from the left to at most half, then the replies from the right) or "drop".
  // rl prompts are never cut: a prompt too long is dropped. Both are counted.
  std::string overlong = "truncate";
  uint64_t seed = 0;          // only used for fractional mixing weights (which records a 0.5 keeps)
  int threads = 0;            // 0 = every core
  uint64_t shard_tokens = uint64_t{1} << 28;  // tokens per shard file (1 GiB of ids)
  int64_t block_lines = 8192;  // lines tokenized together
  bool force = false;          // rebuild even when fresh
  bool quiet = false;          // no progress line or summary on stderr
};

struct PrepareSummary {
  int64_t read = 0;        // non-blank lines read
  int64_t skipped = 0;     // bad lines skipped (on_error = skip)
  int64_t truncated = 0;   // records cut to max_seq_len
  int64_t dropped = 0;     // records over max_seq_len dropped (overlong = drop, or rl)
  int64_t excluded = 0;    // records a fractional weight left out
  int64_t docs = 0;        // entries in docs.idx (weights > 1 repeat records)
  int64_t rows = 0;        // rows the loader walks per epoch
  int64_t tokens = 0;      // distinct tokens written
  int64_t targets = 0;     // tokens with mask 1, over docs.idx (repeats counted)
  double padding_fraction = 0;  // sft: of rows of max_seq_len (packed or one document a row)
};

struct PrepareResult {
  std::string dir;
  bool reused = false;  // the folder was fresh and left untouched
  PrepareSummary summary;
  double seconds = 0;
  uint64_t input_bytes = 0;
};

// Builds `dir` from `options`, or reuses it when its manifest matches (same format, options,
// tokenizer bytes and source bytes; checked by SHA-256) unless options.force. Bad records: with
// on_error = fail, throws ptk::Error listing them ("file:line: reason", up to 20, then a count)
// before anything replaces `dir`; with skip, lists them in dir/skipped.txt and on stderr.
PrepareResult prepare(const PrepareOptions& options, const std::string& dir);

// True when `dir` holds a complete prepared folder for exactly these options (hashes the sources).
bool is_fresh(const PrepareOptions& options, const std::string& dir);

// The one-line summary printed after a prepare ("12,345 records read, 3 skipped, ...").
std::string summary_line(const PrepareResult& r);

// Options from a recipe's shared sections: sources = data.train (or data.eval when `eval`),
// tokenizer = tokenizer.path or model.path, max_seq_len, packing, on_error. `format` comes from
// the stage. Throws ptk::Error when no tokenizer is named.
PrepareOptions prepare_options_from_recipe(const config::DataSection& data, const config::TokenizerSection& tok,
                                           const config::ModelSection& model, int64_t seed, Format format,
                                           bool eval = false);

// Where a stage keeps its prepared data: <run_dir>/data/<split> (split: "train" | "eval").
std::string prepared_dir(const std::string& run_dir, const std::string& split);

// What stages call at start: prepare(options, dir), reusing a fresh folder. Returns the folder.
std::string ensure_prepared(const PrepareOptions& options, const std::string& dir);

// SHA-256 of a file's bytes, lowercase hex (64 characters).
std::string sha256_file(const std::string& path);
std::string sha256_hex(const void* data, size_t n);

}  // namespace ptk::data
