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
#include <utility>
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
  // data.columns: (ptk field, dataset column) renames applied to every record (records.h ParseOptions).
  std::vector<std::pair<std::string, std::string>> columns;
  // data.eval_split: with split kTrain or kEval, a record goes to eval when a hash of its content
  // (records.h ParseOptions::content_hash) falls below eval_split, else to train; the same record
  // lands on the same side in every file format and on every run (no seed). Bad records are
  // reported by the kTrain side only.
  enum class Split { kAll, kTrain, kEval };
  Split split = Split::kAll;
  double eval_split = 0;
};

// Whether a record with this content hash belongs to the eval side of data.eval_split = `fraction`.
bool in_eval_split(uint64_t content_hash, double fraction);

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
  int64_t other_split = 0;      // records data.eval_split put on the other side (train <-> eval)
  // Plain-text prompt/completion records (sft) and pairs (preference) whose prompt and completion
  // (a reply) would merge tokens across the boundary if encoded as one text ('.M'|'aking'); prepare
  // encodes them apart, as generation does (core/tokenizer/prompt_completion.h). Kept records only.
  int64_t boundary_merged = 0;
};

struct PrepareResult {
  std::string dir;
  bool reused = false;  // the folder was fresh and left untouched
  PrepareSummary summary;
  double seconds = 0;
  uint64_t input_bytes = 0;
  // The first kExamplePositions records ("file:line") truncated, dropped, and with a boundary merge
  // (the counts are in summary); manifest.json keeps them as "examples".
  static constexpr size_t kExamplePositions = 5;
  std::vector<std::string> truncated_at, dropped_at, merged_at;
};

// Truncation above this fraction of the records tokenized (read - skipped - excluded) warns.
constexpr double kWarnTruncatedFraction = 0.05;

// What prepare left out of training, as loud warnings: truncated records above
// kWarnTruncatedFraction, any dropped record; each with the counts, the key to change
// (data.max_seq_len, ...) and example positions (file:line). Then a note (not a warning) when
// records had a boundary merge avoided. Empty when there is nothing to say. prepare() prints these
// on stderr (also when it reuses a folder) unless options.quiet.
std::vector<std::string> prepare_warnings(const PrepareOptions& options, const PrepareResult& result);

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
// tokenizer = tokenizer.path or model.path, max_seq_len, packing, on_error, columns. `format` comes
// from the stage. With data.eval_split > 0 (and no data.eval), both sides read data.train: split
// kTrain, or kEval when `eval`. Throws ptk::Error when no tokenizer is named.
PrepareOptions prepare_options_from_recipe(const config::DataSection& data, const config::TokenizerSection& tok,
                                           const config::ModelSection& model, int64_t seed, Format format,
                                           bool eval = false);

// Whether a recipe has held-out data: data.eval, or data.eval_split > 0.
bool has_eval_data(const config::DataSection& data);

// Where a stage keeps its prepared data: <run_dir>/data/<split> (split: "train" | "eval").
std::string prepared_dir(const std::string& run_dir, const std::string& split);

// What stages call at start: prepare(options, dir), reusing a fresh folder. Returns the folder.
std::string ensure_prepared(const PrepareOptions& options, const std::string& dir);

// SHA-256 of a file's bytes, lowercase hex (64 characters).
std::string sha256_file(const std::string& path);
std::string sha256_hex(const void* data, size_t n);

}  // namespace ptk::data
