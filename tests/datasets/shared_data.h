// Maps the real sets in ../shared/data (their own field names: Alpaca, ShareGPT, HH-RLHF, GSM8K ...)
// to docs/DESIGN.md's JSONL formats, in memory. Used by the integration test and the prepare benchmark.
// Not a product feature: ptk reads only docs/DESIGN.md's formats; this is how a user's converter looks.
#pragma once
#include <string>
#include <vector>

#include "datasets/records.h"  // Format

namespace ptk::test {

struct MappedSet {
  std::string name;      // e.g. "sft/lima"
  data::Format format;   // which reader it goes through
  std::string source;    // file(s) under data/
  std::string mapping;   // how fields were mapped, one line
  std::vector<std::string> lines;  // JSONL records in docs/DESIGN.md's format
};

// Every mappable set under `data_dir` (../shared/data). Files left out (and why) are listed by
// unmapped_shared_files().
std::vector<MappedSet> map_shared_data(const std::string& data_dir);
std::vector<std::string> unmapped_shared_files();

// The chat conversations of the sft sets that have an assistant turn, each a compact JSON message list ("[{...},...]").
std::vector<std::string> shared_chat_conversations(const std::string& data_dir);

}  // namespace ptk::test
