// The on-disk layout of a prepared folder, shared by the writer (prepare.cpp) and the reader
// (loader.cpp). Not an API for stages: they use PreparedSet and Loader (loader.h).
//
//   manifest.json        written last: what went in (sources, tokenizer, options), counts, files
//   tokens-NNNNN.u32     token ids, little-endian uint32, documents back to back
//   mask-NNNNN.u8        one byte per token: 1 = the token is a training target (TRL label != -100)
//   docs.idx             DocEntry[num_docs]
//   meta.bin             rl only: each record's JSON (answer and extra fields), referenced by DocEntry
//   rows.idx, rows.docs  packed sft only: uint64 offsets[num_rows + 1] into uint32 doc ids
//   skipped.txt          every skipped line as "file:line: reason" (on_error = skip)
#pragma once
#include <cstdint>

namespace ptk::data {

// Bump when the bytes written change. 2: prompt/completion masks and seg_a with NFC tokenizers
// (Qwen) on a line that NFC changes (completion tokens on the prompt's last line had no loss).
// 3: conversational prompt/completion masks are TRL's completion_mask (every token after the
// prompt's render, the template's "\n" after <|im_end|> included), not the assistant mask; ties
// in packing go to the oldest row; unpacked rows truncation leaves without a target are dropped.
// 4: plain-text prompt/completion records tokenized apart (encode(prompt) + encode(completion), as
// at generation; a merge across the boundary no longer hides the completion's start from the loss);
// the manifest counts boundary merges and keeps example positions and the tokenizer's path.
// 5: chat templates rendered by the Jinja interpreter (the folder's own under auto), tool calls and
// "tools" in chat records.
constexpr int kPrepareVersion = 5;

// One document (sft), pair (preference: prompt, chosen, rejected back to back) or prompt (rl).
// A mixing weight above 1 repeats entries that point at the same tokens.
struct DocEntry {
  uint64_t offset;       // first token inside its shard
  uint64_t meta_offset;  // rl: byte offset in meta.bin; else 0
  uint32_t shard;        // NNNNN of tokens-NNNNN.u32
  uint32_t length;       // tokens in total
  uint32_t seg_a;        // preference: prompt tokens; sft prompt/completion: prompt tokens; else 0
  uint32_t seg_b;        // preference: chosen tokens (rejected = length - seg_a - seg_b); else 0
  uint32_t meta_len;     // rl: bytes in meta.bin
  uint32_t source;       // index into manifest "sources"
  uint32_t line;         // 1-based line in that source
  uint32_t reserved;     // 0
};
static_assert(sizeof(DocEntry) == 48, "DocEntry is part of the file format");

}  // namespace ptk::data
