// prepare: read JSONL blocks, parse + tokenize each block on every core, write tokens/masks/index in
// input order, pack, then manifest.json and the rename (see prepare.h). Not the loader.
#include "datasets/prepare.h"

#include <openssl/evp.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <memory>
#include <thread>
#include <condition_variable>
#include <exception>
#include <functional>
#include <initializer_list>
#include <mutex>

#include "core/tokenizer/prompt_completion.h"
#include "core/train/progress.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "datasets/packing.h"
#include "datasets/readers.h"
#include "datasets/shards.h"

namespace ptk::data {

namespace fs = std::filesystem;
using tokenizer::TokenId;
using tokenizer::Tokenizer;

// ---- hashing ---------------------------------------------------------------------------------

std::string sha256_hex(const void* data, size_t n) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data, n, md, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

std::string sha256_file(const std::string& path) {
  int fd = open_regular_file(path);  // a FIFO or a folder is refused here, before any read blocks
  FILE* f = ::fdopen(fd, "rb");
  if (!f) {
    int saved = errno;
    ::close(fd);
    throw Error("cannot open " + path + ": " + std::strerror(saved));
  }
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) EVP_DigestUpdate(ctx.get(), buf.data(), n);
  bool bad = std::ferror(f);
  std::fclose(f);
  if (bad) throw Error("cannot read " + path);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < len; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

namespace {

using Writer = rapidjson::Writer<rapidjson::StringBuffer>;

void write_str(Writer& w, const std::string& s) { w.String(s.data(), static_cast<rapidjson::SizeType>(s.size())); }

// tokenizer.json and tokenizer_config.json (when present) of a tokenizer path.
std::vector<std::string> tokenizer_files(const std::string& path) {
  if (path.empty())
    throw Error("no tokenizer given\n---> HINT: set tokenizer.path (or model.path), or pass --tokenizer DIR_OR_tokenizer.json");
  std::string json = fs::is_directory(path) ? path + "/tokenizer.json" : path;
  if (!path_exists(json)) throw Error("tokenizer: " + json + " does not exist\n---> HINT: point tokenizer.path at an HF folder");
  std::vector<std::string> files{json};
  std::string cfg = parent_dir(json) + "/tokenizer_config.json";
  if (path_exists(cfg)) files.push_back(cfg);
  std::string jinja = parent_dir(json) + "/chat_template.jinja";  // the folder's template (transformers 5)
  if (path_exists(jinja)) files.push_back(jinja);
  return files;
}

bool has_fractional_weight(const std::vector<SourceFile>& files) {
  for (const auto& f : files)
    if (f.weight != std::floor(f.weight)) return true;
  return false;
}

// What a prepared folder is a function of, as compact JSON (compared byte for byte).
std::string identity_json(const PrepareOptions& o, const std::vector<SourceFile>& files,
                          const std::vector<std::string>& hashes) {
  rapidjson::StringBuffer sb;
  Writer w(sb);
  w.StartObject();
  w.Key("version");
  w.Int(kPrepareVersion);
  w.Key("format");
  w.String(format_name(o.format));
  w.Key("max_seq_len");
  w.Int64(o.max_seq_len);
  w.Key("packing");
  w.Bool(o.format == Format::kSft && o.packing);
  w.Key("overlong");
  write_str(w, o.overlong);
  w.Key("on_error");
  write_str(w, o.on_error);
  w.Key("chat_template");
  write_str(w, o.chat_template);
  if (o.chat_template != "auto" && o.chat_template != "qwen2.5" && o.chat_template != "chatml" &&
      path_exists(o.chat_template) && !fs::is_directory(o.chat_template)) {
    w.Key("chat_template_sha256");  // a template file: its text decides the rows, not its name
    write_str(w, sha256_file(o.chat_template));
  }
  if (!o.chat_template_kwargs.empty()) {
    w.Key("chat_template_kwargs");
    write_str(w, o.chat_template_kwargs);
  }
  w.Key("tokenizer_sha256");
  std::string tok_hash;
  for (const auto& f : tokenizer_files(o.tokenizer_path)) tok_hash += fs::path(f).filename().string() + ":" + sha256_file(f) + ";";
  write_str(w, sha256_hex(tok_hash.data(), tok_hash.size()));
  if (has_fractional_weight(files)) {
    w.Key("seed");
    w.Uint64(o.seed);
  }
  if (!o.columns.empty()) {  // only when set: folders prepared before data.columns stay fresh
    w.Key("columns");
    w.StartObject();
    for (const auto& [field, column] : o.columns) {
      write_str(w, field);
      write_str(w, column);
    }
    w.EndObject();
  }
  if (o.split != PrepareOptions::Split::kAll) {
    w.Key("eval_split");
    w.Double(o.eval_split);
    w.Key("split");
    w.String(o.split == PrepareOptions::Split::kEval ? "eval" : "train");
  }
  w.Key("sources");
  w.StartArray();
  for (size_t i = 0; i < files.size(); ++i) {
    w.StartObject();
    w.Key("path");
    write_str(w, files[i].path);
    w.Key("weight");
    w.Double(files[i].weight);
    w.Key("size");
    w.Uint64(files[i].size);
    w.Key("sha256");
    write_str(w, hashes[i]);
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  return sb.GetString();
}

void check_options(const PrepareOptions& o) {
  if (o.max_seq_len < 2 || o.max_seq_len > (int64_t{1} << 31))
    throw Error("data.max_seq_len must be in [2, 2^31], got " + std::to_string(o.max_seq_len));
  if (o.on_error != "fail" && o.on_error != "skip")
    throw Error("data.on_error must be fail | skip, got `" + o.on_error + "`");
  if (o.overlong != "truncate" && o.overlong != "drop")
    throw Error("overlong policy must be truncate | drop, got `" + o.overlong + "`");
  if (o.shard_tokens < 1) throw Error("prepare: shard_tokens must be >= 1");
  if (o.split != PrepareOptions::Split::kAll && !(o.eval_split > 0 && o.eval_split < 1))
    throw Error("data.eval_split must be a fraction in (0, 1), got " + std::to_string(o.eval_split));
}

std::string json_number(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Copies of a record a mixing weight asks for: floor(w), plus one for a seeded fraction of records.
int copies_for(double weight, uint64_t seed, uint32_t source, int64_t line) {
  double whole = std::floor(weight);
  double frac = weight - whole;
  int n = static_cast<int>(whole);
  if (frac > 0) {
    uint64_t h = splitmix64(seed ^ splitmix64((uint64_t{source} << 40) ^ static_cast<uint64_t>(line)));
    double u = static_cast<double>(h >> 11) * 0x1.0p-53;
    if (u < frac) ++n;
  }
  return n;
}

// One line's outcome.
struct LineResult {
  int64_t line_no = 0;    // JSONL / JSON array: the line the record starts on; Parquet: the row
  int64_t record_no = 0;  // 1-based in its file
  bool bad = false;
  bool other_split = false;  // data.eval_split put it on the other side
  std::string reason;
  int copies = 0;
  bool truncated = false, dropped = false;
  bool boundary_merged = false;  // prompt + completion as one text would merge across the boundary
  std::vector<TokenId> ids;
  std::vector<uint8_t> mask;
  uint32_t seg_a = 0, seg_b = 0;
  std::string meta;
};

// Long records cost memory by max_seq_len, not by their size: each text is encoded only as far as
// the ids that can survive truncation (Tokenizer::head_bytes: the first n ids depend only on the
// first head_bytes(n) bytes), and a prompt cut from the left keeps only its last ids as it goes
// (encode_tail). Every encoding below asks for max_seq_len + 1 ids where truncation keeps the
// first max_seq_len: that many ids are exactly the first ones of the whole record, and "more than
// max_seq_len" is decided as before.

// The first n ids of `text` followed by EOS (TRL appends EOS to language-modeling text and to
// preference replies, unless the text already ends with the EOS token's text: then its last id is
// that EOS and no second one is added); the EOS only survives when the text has fewer than n ids,
// which is where encode_head gives them all.
std::vector<TokenId> encode_head_with_eos(const Tokenizer& tok, std::string_view text, size_t n) {
  std::vector<TokenId> ids = tok.encode_head(text, n);
  if (tok.eos_id() != tokenizer::kNoToken && !tok.ends_with_eos(text)) ids.push_back(tok.eos_id());
  return ids;
}

void tokenize_sft(const Tokenizer& tok, const SftRecord& r, size_t n, LineResult* out) {
  switch (r.kind) {
    case SftRecord::Kind::kMessages: {
      auto e = tok.render_chat(r.messages, false, n, r.chat);
      out->ids = std::move(e.ids);
      out->mask = std::move(e.assistant_mask);
      break;
    }
    case SftRecord::Kind::kPromptCompletion: {
      if (!r.prompt.is_messages) {
        // Tokenized apart, as at generation (core/tokenizer/prompt_completion.h): every completion
        // character is trained even where one text would merge across the boundary ('.M'|'aking').
        auto e = tokenizer::encode_prompt_completion_apart(tok, r.prompt.text, r.completion.text, true, n,
                                                           &out->boundary_merged);
        out->ids = std::move(e.ids);
        out->mask = std::move(e.completion_mask);
        out->seg_a = static_cast<uint32_t>(e.prompt_tokens);
      } else {
        // Loss on every token of the whole conversation's render from where it leaves the prompt's
        // render with the generation prompt: TRL's completion_mask, which starts at the common
        // prefix of the two (common_prefix_length) and so also holds what the template writes
        // after the assistant's <|im_end|> (Qwen2.5's "\n") and any non-assistant turn of the
        // completion. Both renders are whole (a template may render earlier turns differently once
        // later ones are gone), and only their first n ids are encoded.
        std::vector<tokenizer::Message> all = r.prompt.messages;
        all.insert(all.end(), r.completion.messages.begin(), r.completion.messages.end());
        std::vector<TokenId> ids = tok.encode_head(tok.render_chat_text(all, false, r.chat), n);
        std::vector<TokenId> prompt_ids = tok.encode_head(tok.render_chat_text(r.prompt.messages, true, r.chat), n);
        size_t p = 0;
        while (p < prompt_ids.size() && p < ids.size() && prompt_ids[p] == ids[p]) ++p;
        out->ids = std::move(ids);
        out->mask.assign(out->ids.size(), 0);
        for (size_t i = p; i < out->mask.size(); ++i) out->mask[i] = 1;
        out->seg_a = static_cast<uint32_t>(p);
      }
      break;
    }
    case SftRecord::Kind::kText: {
      out->ids = encode_head_with_eos(tok, r.text, n);
      out->mask.assign(out->ids.size(), 1);
      break;
    }
  }
}

// Whether `a` + b encoded as one text gives other ids than `a` and b encoded apart, for some b of
// `bs`, where they meet: the last and the first head_bytes(8) bytes are compared (further away, both
// encodings are the same; see Tokenizer::head_bytes), so a long prompt costs no more than a short one.
bool merges_across(const Tokenizer& tok, std::string_view a, std::initializer_list<std::string_view> bs) {
  const size_t w = tok.head_bytes(8);
  if (w < a.size()) {
    size_t from = a.size() - w;
    while (from < a.size() && (static_cast<unsigned char>(a[from]) & 0xC0) == 0x80) ++from;  // a character's start
    a = a.substr(from);
  }
  const std::vector<TokenId> head = tok.encode(a);
  for (std::string_view b : bs) {
    b = tokenizer::utf8_head(b, w);
    std::vector<TokenId> apart = head, tail = tok.encode(b);
    apart.insert(apart.end(), tail.begin(), tail.end());
    std::string joint(a);
    joint += b;
    if (tok.encode(joint) != apart) return true;
  }
  return false;
}

// Prompt text with the generation prompt, and each reply as the text the full render adds after it
// (TRL: apply_chat_template(prompt + reply)[len(prompt):]). Renders are whole: a template may
// render the prompt's turns differently from its contents (Qwen3's <think> handling, tool results).
bool render_pair_texts(const Tokenizer& tok, const PreferenceRecord& r, std::string* p, std::string* c,
                       std::string* rj, std::string* reason) {
  *p = tok.render_chat_text(r.prompt.messages, true, r.chat);
  for (int k = 0; k < 2; ++k) {
    const auto& reply = k == 0 ? r.chosen.messages : r.rejected.messages;
    std::vector<tokenizer::Message> all = r.prompt.messages;
    all.insert(all.end(), reply.begin(), reply.end());
    std::string full = tok.render_chat_text(all, false, r.chat);
    if (full.compare(0, p->size(), *p) != 0) {
      *reason = std::string("the chat template renders \"prompt\" + \"") + (k == 0 ? "chosen" : "rejected") +
                "\" differently from \"prompt\" alone (does the reply start with an assistant message?)";
      return false;
    }
    (k == 0 ? *c : *rj) = full.substr(p->size());
  }
  return true;
}

void tokenize_preference(const Tokenizer& tok, const PreferenceRecord& r, const PrepareOptions& o, LineResult* out) {
  const size_t L = static_cast<size_t>(o.max_seq_len);
  // The prompt is cut from the left: its last L ids (all that can survive) and how many it has. The
  // replies are cut from the right: their first L + 1 ids.
  std::vector<TokenId> p, c, rj;
  size_t p_total = 0;
  if (!r.prompt.is_messages) {
    p = tok.encode_tail(r.prompt.text, L, &p_total);
    c = encode_head_with_eos(tok, r.chosen.text, L + 1);
    rj = encode_head_with_eos(tok, r.rejected.text, L + 1);
    // Prompt and replies are tokenized apart (as TRL's DPOTrainer and RewardTrainer do not: they
    // encode prompt + reply as one text); counted where that would merge across the boundary.
    out->boundary_merged = merges_across(tok, r.prompt.text, {r.chosen.text, r.rejected.text});
  } else {
    std::string pt, ct, rt;
    if (!render_pair_texts(tok, r, &pt, &ct, &rt, &out->reason)) {
      out->bad = true;
      return;
    }
    p = tok.encode_tail(pt, L, &p_total);
    c = tok.encode_head(ct, L + 1);
    rj = tok.encode_head(rt, L + 1);
    out->boundary_merged = merges_across(tok, pt, {ct, rt});
  }
  size_t longest = std::max(c.size(), rj.size());
  if (p_total + longest > L) {
    if (o.overlong == "drop") {
      out->dropped = true;
      return;
    }
    size_t keep_p = std::min(p_total, std::max(L / 2, L - std::min(longest, L)));
    p.erase(p.begin(), p.end() - static_cast<std::ptrdiff_t>(keep_p));  // keep the prompt's end
    if (c.size() > L - keep_p) c.resize(L - keep_p);
    if (rj.size() > L - keep_p) rj.resize(L - keep_p);
    out->truncated = true;
  }
  out->seg_a = static_cast<uint32_t>(p.size());
  out->seg_b = static_cast<uint32_t>(c.size());
  out->ids = std::move(p);
  out->ids.insert(out->ids.end(), c.begin(), c.end());
  out->ids.insert(out->ids.end(), rj.begin(), rj.end());
  out->mask.assign(out->ids.size(), 1);
  std::fill(out->mask.begin(), out->mask.begin() + out->seg_a, 0);
}

void tokenize_rl(const Tokenizer& tok, const RlRecord& r, const PrepareOptions& o, LineResult* out) {
  const size_t n = static_cast<size_t>(o.max_seq_len) + 1;  // enough to tell a prompt that is too long
  out->ids = tok.encode_head(r.prompt.is_messages ? tok.render_chat_text(r.prompt.messages, true, r.chat) : r.prompt.text, n);
  if (static_cast<int64_t>(out->ids.size()) > o.max_seq_len) {
    out->ids.clear();
    out->dropped = true;  // a cut prompt asks a different question
    return;
  }
  out->mask.assign(out->ids.size(), 0);
  out->meta = r.record_json;
}

void process_line(const Tokenizer& tok, const PrepareOptions& o, std::string_view line, double weight,
                  uint32_t source, LineResult* out) {
  Record rec;
  uint64_t hash = 0;
  ParseOptions po;
  po.columns = &o.columns;
  if (o.split != PrepareOptions::Split::kAll) po.content_hash = &hash;
  const bool ok = parse_record(line, o.format, po, &rec, &out->reason);
  if ((!ok && o.split == PrepareOptions::Split::kEval) ||  // a bad record is reported by the train side only
      (ok && o.split != PrepareOptions::Split::kAll &&
       in_eval_split(hash, o.eval_split) != (o.split == PrepareOptions::Split::kEval))) {
    out->other_split = true;
    return;
  }
  if (!ok) {
    out->bad = true;
    return;
  }
  out->copies = copies_for(weight, o.seed, source, out->line_no);
  if (out->copies == 0) return;
  switch (o.format) {
    case Format::kSft: {
      tokenize_sft(tok, rec.sft, static_cast<size_t>(o.max_seq_len) + 1, out);
      if (static_cast<int64_t>(out->ids.size()) > o.max_seq_len) {
        if (o.overlong == "drop") {
          out->dropped = true;
        } else {
          out->ids.resize(o.max_seq_len);
          out->mask.resize(o.max_seq_len);
          out->seg_a = std::min<uint32_t>(out->seg_a, static_cast<uint32_t>(o.max_seq_len));
          out->truncated = true;
          // A row the cut left without a target (a prompt longer than max_seq_len) is dropped, as
          // TRL drops "examples left fully masked by truncation" from unpacked data: it adds no loss,
          // only a row to a micro-batch. Packed, TRL keeps it, and so does ptk.
          if (!o.packing && std::find(out->mask.begin(), out->mask.end(), uint8_t{1}) == out->mask.end()) {
            out->truncated = false;
            out->dropped = true;
          }
        }
      }
      break;
    }
    case Format::kPreference: tokenize_preference(tok, rec.preference, o, out); break;
    case Format::kRl: tokenize_rl(tok, rec.rl, o, out); break;
  }
}

// Worker threads that live for the whole prepare and run one job per block. The tokenizer's word
// cache is per thread: threads started anew for every block began each block with a cold cache.
class WorkerPool {
 public:
  explicit WorkerPool(int n) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  // Every worker runs `job` once; `job` must outlive the matching wait().
  void start(const std::function<void()>* job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      running_ = static_cast<int>(threads_.size());
      ++generation_;
    }
    start_cv_.notify_all();
  }
  // Until every worker has finished the job; rethrows the first exception a job threw.
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return running_ == 0; });
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void()>* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      std::exception_ptr error;
      try {
        (*job)();
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (error && !error_) error_ = error;
      if (--running_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void()>* job_ = nullptr;
  uint64_t generation_ = 0;
  int running_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

// A file written through a big buffer; fails loudly.
class OutFile {
 public:
  OutFile(const std::string& path) : path_(path), buf_(4 << 20) {
    f_ = std::fopen(path.c_str(), "wb");
    if (!f_) throw Error("cannot create " + path + ": " + std::strerror(errno) + "\n---> HINT: is the output folder writable?");
    std::setvbuf(f_, buf_.data(), _IOFBF, buf_.size());
  }
  ~OutFile() {
    if (f_) std::fclose(f_);
  }
  void write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f_) != n) throw Error("cannot write " + path_ + ": " + std::strerror(errno) + " (disk full?)");
    bytes_ += n;
  }
  void close() {
    if (!f_) return;
    bool ok = std::fflush(f_) == 0 && ::fsync(fileno(f_)) == 0;
    ok = std::fclose(f_) == 0 && ok;
    f_ = nullptr;
    if (!ok) throw Error("cannot finish " + path_ + ": " + std::strerror(errno) + " (disk full?)");
  }
  uint64_t bytes() const { return bytes_; }

 private:
  std::string path_;
  std::vector<char> buf_;
  FILE* f_ = nullptr;
  uint64_t bytes_ = 0;
};

std::string shard_name(const char* prefix, uint32_t shard, const char* ext) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s-%05u.%s", prefix, shard, ext);
  return buf;
}

struct SourceStats {
  int64_t records = 0, skipped = 0, docs = 0, tokens = 0;
};

std::string manifest_json(const PrepareOptions& o, const std::string& identity, const std::vector<SourceFile>& files,
                          const std::vector<SourceStats>& per_source, const PrepareResult& res,
                          const std::vector<std::pair<std::string, uint64_t>>& out_files,
                          const std::vector<uint64_t>& shard_tokens) {
  rapidjson::StringBuffer sb;
  rapidjson::PrettyWriter<rapidjson::StringBuffer> w(sb);
  w.SetIndent(' ', 2);
  rapidjson::Document id = json::parse(identity, "prepare identity");
  const PrepareSummary& s = res.summary;
  w.StartObject();
  w.Key("ptk_prepared");
  w.Int(kPrepareVersion);
  w.Key("format");
  w.String(format_name(o.format));
  w.Key("key");
  id.Accept(w);
  w.Key("counts");
  w.StartObject();
  w.Key("read"), w.Int64(s.read);
  w.Key("skipped"), w.Int64(s.skipped);
  w.Key("truncated"), w.Int64(s.truncated);
  w.Key("dropped"), w.Int64(s.dropped);
  w.Key("excluded_by_weight"), w.Int64(s.excluded);
  w.Key("docs"), w.Int64(s.docs);
  w.Key("rows"), w.Int64(s.rows);
  if (o.split != PrepareOptions::Split::kAll) w.Key("other_split"), w.Int64(s.other_split);
  w.Key("boundary_merged"), w.Int64(s.boundary_merged);
  w.EndObject();
  // A few positions of each (prepare_warnings names them, also when the folder is reused).
  w.Key("examples");
  w.StartObject();
  for (auto [name, list] : {std::pair<const char*, const std::vector<std::string>*>{"truncated", &res.truncated_at},
                            {"dropped", &res.dropped_at},
                            {"boundary_merged", &res.merged_at}}) {
    w.Key(name);
    w.StartArray();
    for (const auto& x : *list) write_str(w, x);
    w.EndArray();
  }
  w.EndObject();
  // Where the tokenizer was (ptk inspect-data decodes with it); not part of the key, which has its hash.
  w.Key("tokenizer_path");
  write_str(w, o.tokenizer_path);
  w.Key("tokens");
  w.StartObject();
  w.Key("written"), w.Int64(s.tokens);
  w.Key("targets"), w.Int64(s.targets);
  w.Key("padding_fraction"), w.Double(s.padding_fraction);
  w.EndObject();
  w.Key("per_source");
  w.StartArray();
  for (size_t i = 0; i < files.size(); ++i) {
    w.StartObject();
    w.Key("path"), w.String(files[i].path.c_str());
    w.Key("records"), w.Int64(per_source[i].records);
    w.Key("skipped"), w.Int64(per_source[i].skipped);
    w.Key("docs"), w.Int64(per_source[i].docs);
    w.Key("tokens"), w.Int64(per_source[i].tokens);
    w.EndObject();
  }
  w.EndArray();
  w.Key("shards");
  w.StartArray();
  for (uint64_t n : shard_tokens) w.Uint64(n);
  w.EndArray();
  w.Key("files");
  w.StartObject();
  for (const auto& [name, size] : out_files) {
    w.Key(name.c_str());
    w.Uint64(size);
  }
  w.EndObject();
  w.EndObject();
  return std::string(sb.GetString()) + "\n";
}

// The manifest's "key" as compact JSON, or "" when the folder has no readable manifest or a file
// it lists is missing or has another size.
std::string existing_identity(const std::string& dir) {
  std::string path = dir + "/manifest.json";
  if (!path_exists(path)) return "";
  rapidjson::Document d;
  try {
    d = json::parse_file(path);
  } catch (const Error&) {
    return "";
  }
  if (!d.IsObject() || !d.HasMember("key") || !d.HasMember("files") || !d["files"].IsObject()) return "";
  for (auto it = d["files"].MemberBegin(); it != d["files"].MemberEnd(); ++it) {
    struct stat st {};
    std::string f = dir + "/" + it->name.GetString();
    if (::stat(f.c_str(), &st) != 0 || !it->value.IsUint64() || static_cast<uint64_t>(st.st_size) != it->value.GetUint64())
      return "";
  }
  return json::to_string(d["key"]);
}

void remove_tree(const std::string& p) {
  std::error_code ec;
  fs::remove_all(p, ec);
}

}  // namespace

bool is_fresh(const PrepareOptions& options, const std::string& dir) {
  check_options(options);
  auto files = expand_sources(options.sources, options.sources_key);
  std::vector<std::string> hashes;
  for (const auto& f : files) hashes.push_back(sha256_file(f.path));
  std::string have = existing_identity(dir);
  return !have.empty() && have == identity_json(options, files, hashes);
}

PrepareResult prepare(const PrepareOptions& o, const std::string& dir) {
  auto t0 = std::chrono::steady_clock::now();
  check_options(o);
  PrepareResult res;
  res.dir = dir;
  auto files = expand_sources(o.sources, o.sources_key);
  if (files.size() > (size_t{1} << 31)) throw Error("prepare: too many source files");
  std::vector<std::string> hashes;
  for (const auto& f : files) {
    hashes.push_back(sha256_file(f.path));
    res.input_bytes += f.size;
  }
  const std::string identity = identity_json(o, files, hashes);
  if (!o.force && existing_identity(dir) == identity) {
    rapidjson::Document m = json::parse_file(dir + "/manifest.json");
    const auto& c = m["counts"];
    const auto& t = m["tokens"];
    res.reused = true;
    res.summary = {c["read"].GetInt64(),  c["skipped"].GetInt64(), c["truncated"].GetInt64(),
                   c["dropped"].GetInt64(), c["excluded_by_weight"].GetInt64(), c["docs"].GetInt64(),
                   c["rows"].GetInt64(),  t["written"].GetInt64(), t["targets"].GetInt64(),
                   t["padding_fraction"].GetDouble()};
    if (c.HasMember("other_split") && c["other_split"].IsInt64()) res.summary.other_split = c["other_split"].GetInt64();
    if (c.HasMember("boundary_merged") && c["boundary_merged"].IsInt64()) res.summary.boundary_merged = c["boundary_merged"].GetInt64();
    if (m.HasMember("examples") && m["examples"].IsObject()) {
      for (auto [name, list] : {std::pair<const char*, std::vector<std::string>*>{"truncated", &res.truncated_at},
                                {"dropped", &res.dropped_at},
                                {"boundary_merged", &res.merged_at}}) {
        if (!m["examples"].HasMember(name) || !m["examples"][name].IsArray()) continue;
        for (const auto& x : m["examples"][name].GetArray())
          if (x.IsString()) list->push_back(x.GetString());
      }
    }
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!o.quiet) {
      std::cerr << "prepare: " << dir << " is up to date (" << summary_line(res) << ")\n";
      for (const auto& warning : prepare_warnings(o, res)) std::cerr << warning << "\n";
    }
    return res;
  }

  Tokenizer tok = Tokenizer::load(o.tokenizer_path, tokenizer::chat_load_options(o.chat_template, o.chat_template_kwargs));
  // Work in a temporary sibling folder; it replaces `dir` only when complete.
  std::string parent = parent_dir(dir);
  make_dirs(parent);
  const std::string tmp = dir + ".tmp-" + std::to_string(::getpid());
  remove_tree(tmp);
  make_dirs(tmp);
  struct TmpGuard {
    std::string path;
    bool keep = false;
    ~TmpGuard() {
      if (!keep) remove_tree(path);
    }
  } guard{tmp};

  const int threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  PrepareSummary s;
  std::vector<SourceStats> per_source(files.size());
  std::vector<DocEntry> docs;
  std::vector<uint64_t> shard_tokens{0};
  auto tokens_out = std::make_unique<OutFile>(tmp + "/" + shard_name("tokens", 0, "u32"));
  auto mask_out = std::make_unique<OutFile>(tmp + "/" + shard_name("mask", 0, "u8"));
  std::unique_ptr<OutFile> meta_out;
  if (o.format == Format::kRl) meta_out = std::make_unique<OutFile>(tmp + "/meta.bin");
  std::vector<std::string> bad_lines;  // "file:line: reason"
  std::unique_ptr<OutFile> skipped_out;
  if (o.on_error == "skip") skipped_out = std::make_unique<OutFile>(tmp + "/skipped.txt");
  constexpr size_t kShowBad = 20;

  std::unique_ptr<Progress> progress;
  if (!o.quiet) progress = std::make_unique<Progress>("prepare", static_cast<int64_t>(res.input_bytes >> 20), "MiB");

  // Three blocks in flight: the main thread writes block k-1 and reads block k+1 while the workers
  // parse and tokenize block k, so no core waits on the (short) serial parts.
  struct Block {
    uint32_t src = 0;
    std::string text;                 // the block's lines back to back (capacity kept across blocks)
    std::vector<size_t> line_end;     // line i is text[line_end[i-1] (or 0), line_end[i])
    std::vector<LineResult> results;
    size_t size() const { return line_end.size(); }
    std::string_view line(size_t i) const {
      size_t b = i == 0 ? 0 : line_end[i - 1];
      return std::string_view(text).substr(b, line_end[i] - b);
    }
    uint64_t bytes_done = 0;  // input bytes read when the block was complete (progress)
    FileKind kind = FileKind::kJsonl;
  };
  uint32_t read_src = 0;
  std::unique_ptr<RecordReader> reader;
  uint64_t bytes_before = 0;
  // Fills `b` with the next lines of one source file; false when every file is read.
  auto read_block = [&](Block* b) {
    if (b->text.capacity() > (128u << 20)) std::string().swap(b->text);  // not kept after a huge line
    b->text.clear();
    b->line_end.clear();
    b->results.clear();
    while (read_src < files.size()) {
      if (!reader) {
        check_regular_file(files[read_src].path);  // hashed above, but it may have been replaced since
        reader = open_records(files[read_src].path);  // JSONL, JSON array, .gz of either, Parquet
        std::string need;
        const auto columns = reader->columns();
        if (!columns.empty() && !columns_fit(o.format, columns, o.columns, &need)) {
          std::string have;
          for (const auto& c : columns) have += (have.empty() ? "\"" : ", \"") + c + "\"";
          throw Error(files[read_src].path + ": its columns (" + have + ") hold no " + format_name(o.format) +
                      " record: it needs " + need + "\n---> HINT: map your columns to these names with "
                      "data.columns={\"prompt\": \"your_column\", ...}");
        }
      }
      b->kind = reader->kind();
      RecordPos pos;
      size_t block_bytes = 0;
      bool more = true;
      while (static_cast<int64_t>(b->size()) < o.block_lines && block_bytes < (64u << 20)) {
        // Straight into the block: a huge line is held here once, not also in the reader.
        const size_t start = b->text.size();
        if (!reader->append_next(&b->text, &pos)) {
          more = false;
          break;
        }
        const size_t len = b->text.size() - start;
        if (is_blank_line(std::string_view(b->text).substr(start))) {
          b->text.resize(start);
          continue;
        }
        b->line_end.push_back(b->text.size());
        block_bytes += len;
        b->results.emplace_back();
        b->results.back().line_no = pos.line > 0 ? pos.line : pos.record;
        b->results.back().record_no = pos.record;
      }
      b->src = read_src;
      b->bytes_done = bytes_before + reader->bytes_read();
      if (!more) {
        bytes_before += files[read_src].size;
        reader.reset();
        ++read_src;
      }
      if (b->size() > 0) return true;
    }
    return false;
  };
  auto write_block = [&](Block* b) {
    const uint32_t src = b->src;
    const SourceFile& file = files[src];
    for (auto& r : b->results) {
      ++s.read;
      ++per_source[src].records;
      if (r.other_split) {
        --s.read;
        --per_source[src].records;
        ++s.other_split;
        continue;
      }
      if (r.bad) {
        if (b->kind == FileKind::kJsonArray &&
            (r.reason.rfind("invalid JSON", 0) == 0 || r.reason.rfind("invalid UTF-8", 0) == 0))
          // Not one bad record: the file as a whole is not valid JSON (json.load and `datasets` refuse it).
          throw Error(record_position(file.path, b->kind, {r.record_no, r.line_no}) + ": " + r.reason +
                      "\n---> HINT: a JSON array file must be valid JSON as a whole (data.on_error=skip does not apply); "
                      "check it with `python3 -m json.tool " + file.path + " > /dev/null`");
        std::string msg = record_position(file.path, b->kind, {r.record_no, r.line_no}) + ": " + r.reason;
        ++s.skipped;
        ++per_source[src].skipped;
        if (skipped_out) {
          skipped_out->write(msg.data(), msg.size());
          skipped_out->write("\n", 1);
          if (bad_lines.size() < kShowBad) bad_lines.push_back(msg);
        } else {
          bad_lines.push_back(msg);
        }
        continue;
      }
      if (r.copies == 0) {
        ++s.excluded;
        continue;
      }
      auto note = [&](std::vector<std::string>* at) {
        if (at->size() < PrepareResult::kExamplePositions)
          at->push_back(record_position(file.path, b->kind, {r.record_no, r.line_no}));  // a Parquet row is no line
      };
      if (r.dropped) {
        ++s.dropped;
        note(&res.dropped_at);
        continue;
      }
      if (r.truncated) {
        ++s.truncated;
        note(&res.truncated_at);
      }
      if (r.boundary_merged) {
        ++s.boundary_merged;
        note(&res.merged_at);
      }
      if (r.ids.empty()) continue;  // cannot happen for valid records; never write empty documents
      uint32_t shard = static_cast<uint32_t>(shard_tokens.size() - 1);
      if (shard_tokens.back() > 0 && shard_tokens.back() + r.ids.size() > o.shard_tokens) {
        tokens_out->close();
        mask_out->close();
        ++shard;
        shard_tokens.push_back(0);
        tokens_out = std::make_unique<OutFile>(tmp + "/" + shard_name("tokens", shard, "u32"));
        mask_out = std::make_unique<OutFile>(tmp + "/" + shard_name("mask", shard, "u8"));
      }
      DocEntry e{};
      e.offset = shard_tokens.back();
      e.shard = shard;
      e.length = static_cast<uint32_t>(r.ids.size());
      e.seg_a = r.seg_a;
      e.seg_b = r.seg_b;
      e.source = src;
      e.line = static_cast<uint32_t>(r.line_no);
      if (meta_out) {
        e.meta_offset = meta_out->bytes();
        e.meta_len = static_cast<uint32_t>(r.meta.size());
        meta_out->write(r.meta.data(), r.meta.size());
      }
      // Ids are written as uint32: TokenId is int32 and ids are >= 0, so the bytes are the same.
      static_assert(sizeof(TokenId) == sizeof(uint32_t), "token ids are 32-bit");
      tokens_out->write(r.ids.data(), r.ids.size() * sizeof(uint32_t));
      mask_out->write(r.mask.data(), r.mask.size());
      shard_tokens.back() += r.ids.size();
      s.tokens += static_cast<int64_t>(r.ids.size());
      per_source[src].tokens += static_cast<int64_t>(r.ids.size());
      int64_t targets = 0;
      // The first token of a document is never a target (nothing predicts it).
      for (size_t i = o.format == Format::kPreference ? 0 : 1; i < r.mask.size(); ++i) targets += r.mask[i];
      for (int k = 0; k < r.copies; ++k) docs.push_back(e);
      s.docs += r.copies;
      per_source[src].docs += r.copies;
      s.targets += targets * r.copies;
    }
    if (o.on_error == "fail" && !bad_lines.empty()) {
      std::string msg = "prepare: " + std::to_string(bad_lines.size()) + " bad record" +
                        (bad_lines.size() == 1 ? "" : "s") + " (data.on_error = fail):\n";
      // Every record of the block refused for the same reason is the file's problem, not the
      // records': said once, naming the file (e.g. a dataset whose fields need data.columns).
      const std::string first_reason = bad_lines[0].substr(bad_lines[0].find(": ") + 2);
      // Records data.eval_split sent to the other side were not parsed for this side: not counted.
      const size_t this_side = static_cast<size_t>(std::count_if(b->results.begin(), b->results.end(),
                                                                 [](const auto& x) { return !x.other_split; }));
      const bool all_same = bad_lines.size() > 1 && bad_lines.size() == this_side &&
                            std::all_of(bad_lines.begin(), bad_lines.end(), [&](const std::string& l) {
                              return l.size() >= first_reason.size() &&
                                     l.compare(l.size() - first_reason.size(), first_reason.size(), first_reason) == 0;
                            });
      if (all_same) {
        throw Error("prepare: " + file.path + ": all " + std::to_string(bad_lines.size()) + " records read (from " +
                    bad_lines[0].substr(0, bad_lines[0].find(": ")) + ") are refused: " + first_reason +
                    "\n---> HINT: is this the " + format_name(o.format) + " format? Rename the file's fields with "
                    "data.columns={\"prompt\": \"your_column\", ...} or check --format");
      }
      for (size_t i = 0; i < std::min(bad_lines.size(), kShowBad); ++i) msg += "  " + bad_lines[i] + "\n";
      if (bad_lines.size() > kShowBad) msg += "  ... and " + std::to_string(bad_lines.size() - kShowBad) + " more\n";
      msg += "---> HINT: fix these lines, or set data.on_error=skip to skip and list them";
      throw Error(msg);
    }
    if (progress)
      progress->update(static_cast<int64_t>(b->bytes_done >> 20),
                       std::to_string(s.read) + " records, " + std::to_string(s.tokens) + " tokens");
  };

  Block blocks[3];
  WorkerPool pool(threads);
  Block* prev = nullptr;
  Block* cur = read_block(&blocks[0]) ? &blocks[0] : nullptr;
  int slot = 1;
  while (cur) {
    // Workers: chunks of 16 lines of `cur`, handed out in order.
    std::atomic<size_t> next_chunk{0};
    const SourceFile& file = files[cur->src];
    const uint32_t src = cur->src;
    Block* work_block = cur;
    auto work = [&] {
      for (;;) {
        size_t b = next_chunk.fetch_add(16);
        if (b >= work_block->size()) return;
        for (size_t i = b; i < std::min(work_block->size(), b + 16); ++i) {
          try {
            process_line(tok, o, work_block->line(i), file.weight, src, &work_block->results[i]);
          } catch (const tokenizer::ChatTemplateError&) {
            throw;  // the tokenizer's template itself (none, unreadable): reported once, prepare fails
          } catch (const std::exception& e) {  // e.g. the chat template refusing a conversation
            work_block->results[i].bad = true;
            work_block->results[i].reason = e.what();
          }
        }
      }
    };
    const std::function<void()> job = work;
    pool.start(&job);
    Block* next = &blocks[slot];
    slot = (slot + 1) % 3;
    bool have_next = false;
    try {
      if (prev) write_block(prev);
      have_next = read_block(next);
    } catch (...) {
      try {
        pool.wait();
      } catch (...) {  // the main thread's error is the one to report
      }
      throw;
    }
    pool.wait();
    prev = cur;
    cur = have_next ? next : nullptr;
  }
  if (prev) write_block(prev);
  tokens_out->close();
  mask_out->close();
  if (meta_out) meta_out->close();
  if (skipped_out) skipped_out->close();
  if (docs.empty() && o.split == PrepareOptions::Split::kEval)
    throw Error("prepare: data.eval_split = " + json_number(o.eval_split) + " put none of the " +
                std::to_string(s.other_split + s.read) + " records of " + o.sources_key +
                " in eval\n---> HINT: raise data.eval_split, or name held-out files in data.eval");
  if (docs.empty())
    throw Error("prepare: no usable record in " + o.sources_key + " (" + std::to_string(s.read) + " read, " +
                std::to_string(s.skipped) + " skipped, " + std::to_string(s.dropped) + " over max_seq_len " +
                std::to_string(o.max_seq_len) + ")" + (bad_lines.empty() ? "" : "; the first skipped: " + bad_lines[0]) +
                "\n---> HINT: check the format (--format sft|preference|rl) and data.max_seq_len; data.columns maps "
                "other field names");
  if (docs.size() > (size_t{1} << 32) - 1) throw Error("prepare: more than 2^32 documents; split the dataset");

  {
    OutFile idx(tmp + "/docs.idx");
    idx.write(docs.data(), docs.size() * sizeof(DocEntry));
    idx.close();
  }
  uint64_t doc_tokens = 0;
  for (const auto& d : docs) doc_tokens += d.length;
  s.rows = static_cast<int64_t>(docs.size());
  const uint32_t L = static_cast<uint32_t>(o.max_seq_len);
  if (o.format == Format::kSft && o.packing) {
    std::vector<uint32_t> lengths(docs.size());
    for (size_t i = 0; i < docs.size(); ++i) lengths[i] = docs[i].length;
    auto rows = pack_best_fit_decreasing(lengths, L);
    std::vector<uint64_t> offsets{0};
    OutFile row_docs(tmp + "/rows.docs");
    for (const auto& r : rows) {
      row_docs.write(r.data(), r.size() * sizeof(uint32_t));
      offsets.push_back(offsets.back() + r.size());
    }
    row_docs.close();
    OutFile row_idx(tmp + "/rows.idx");
    row_idx.write(offsets.data(), offsets.size() * sizeof(uint64_t));
    row_idx.close();
    s.rows = static_cast<int64_t>(rows.size());
  }
  if (o.format == Format::kSft) s.padding_fraction = padding_fraction(doc_tokens, static_cast<uint64_t>(s.rows), L);

  std::vector<std::pair<std::string, uint64_t>> out_files;
  for (const auto& entry : fs::directory_iterator(tmp)) out_files.emplace_back(entry.path().filename().string(), entry.file_size());
  std::sort(out_files.begin(), out_files.end());
  res.summary = s;
  write_file_atomic(tmp + "/manifest.json", manifest_json(o, identity, files, per_source, res, out_files, shard_tokens));
  fsync_path(tmp);

  // Swap the folder in: the old one (if any) is moved aside first, so `dir` is always either the
  // previous complete folder, absent, or the new complete one.
  if (path_exists(dir)) {
    std::string old = dir + ".old-" + std::to_string(::getpid());
    remove_tree(old);
    if (std::rename(dir.c_str(), old.c_str()) != 0) throw Error("prepare: cannot move " + dir + " aside: " + std::strerror(errno));
    if (std::rename(tmp.c_str(), dir.c_str()) != 0) throw Error("prepare: cannot rename " + tmp + " to " + dir + ": " + std::strerror(errno));
    remove_tree(old);
  } else if (std::rename(tmp.c_str(), dir.c_str()) != 0) {
    throw Error("prepare: cannot rename " + tmp + " to " + dir + ": " + std::strerror(errno));
  }
  guard.keep = true;
  fsync_path(parent);

  res.summary = s;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (progress) progress->finish(std::to_string(s.read) + " records, " + std::to_string(s.tokens) + " tokens");
  if (!o.quiet) {
    if (o.on_error == "skip" && s.skipped > 0) {
      std::cerr << "prepare: skipped " << s.skipped << " bad record" << (s.skipped == 1 ? "" : "s") << ":\n";
      for (const auto& b : bad_lines) std::cerr << "  " << b << "\n";
      if (s.skipped > static_cast<int64_t>(bad_lines.size()))
        std::cerr << "  ... all " << s.skipped << " listed in " << dir << "/skipped.txt\n";
    }
    std::cerr << "prepare: " << dir << ": " << summary_line(res) << "\n";
    for (const auto& warning : prepare_warnings(o, res)) std::cerr << warning << "\n";
  }
  return res;
}

std::string summary_line(const PrepareResult& r) {
  const auto& s = r.summary;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "%lld records read, %lld skipped, %lld truncated, %lld dropped over max_seq_len, %lld left out by "
                "weight; %lld docs in %lld rows, %lld tokens (%lld targets), padding %.2f%%",
                static_cast<long long>(s.read), static_cast<long long>(s.skipped), static_cast<long long>(s.truncated),
                static_cast<long long>(s.dropped), static_cast<long long>(s.excluded), static_cast<long long>(s.docs),
                static_cast<long long>(s.rows), static_cast<long long>(s.tokens), static_cast<long long>(s.targets),
                100.0 * s.padding_fraction);
  std::string line = buf;
  if (s.other_split > 0) line += "; " + std::to_string(s.other_split) + " records on the other side of data.eval_split";
  if (s.boundary_merged > 0)
    line += "; " + std::to_string(s.boundary_merged) + " boundary merge" + (s.boundary_merged == 1 ? "" : "s") +
            " avoided (prompt and completion tokenized apart)";
  return line;
}

namespace {
std::string percent(int64_t part, int64_t whole) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", whole > 0 ? 100.0 * static_cast<double>(part) / static_cast<double>(whole) : 0.0);
  return buf;
}
std::string positions(const std::vector<std::string>& at, int64_t count) {
  std::string out;
  for (size_t i = 0; i < at.size(); ++i) out += (i ? ", " : "") + at[i];
  if (count > static_cast<int64_t>(at.size())) out += ", ...";
  return out;
}
}  // namespace

std::vector<std::string> prepare_warnings(const PrepareOptions& o, const PrepareResult& r) {
  const PrepareSummary& s = r.summary;
  const int64_t tokenized = s.read - s.skipped - s.excluded;
  const std::string L = std::to_string(o.max_seq_len);
  const std::string of = " of " + std::to_string(tokenized) + " ";
  std::vector<std::string> out;
  const char* unit = o.format == Format::kPreference ? "pairs" : o.format == Format::kRl ? "prompts" : "records";
  if (s.truncated > 0 && static_cast<double>(s.truncated) > kWarnTruncatedFraction * static_cast<double>(tokenized)) {
    std::string what = o.format == Format::kPreference
                           ? " have a prompt + longer reply over data.max_seq_len = " + L +
                                 " tokens and were truncated (the prompt cut from the left to no less than half, then "
                                 "the replies from the right): their cut ends are not trained"
                           : " have more than data.max_seq_len = " + L + " tokens and were truncated to " + L +
                                 ": the rest of each is not trained";
    out.push_back("prepare: WARNING: " + std::to_string(s.truncated) + of + unit + " (" + percent(s.truncated, tokenized) +
                  ")" + what + "; e.g. " + positions(r.truncated_at, s.truncated) +
                  "\n---> HINT: raise data.max_seq_len (ptk prepare --max-seq-len), or shorten these records; `ptk "
                  "inspect-data` shows what is trained");
  }
  if (s.dropped > 0) {
    std::string what;
    if (o.format == Format::kRl) {
      what = " have more than data.max_seq_len = " + L + " tokens and were dropped (a cut prompt asks another question)";
    } else if (o.format == Format::kPreference) {
      what = " have a prompt + reply over data.max_seq_len = " + L + " tokens and were dropped (overlong = drop; the " +
             "reward model drops them, as TRL's RewardTrainer does)";
    } else {
      what = o.overlong == "drop" ? " have more than data.max_seq_len = " + L + " tokens and were dropped (overlong = drop)"
                                  : " were dropped: truncation to data.max_seq_len = " + L +
                                        " tokens left them without a completion token (unpacked rows, as TRL drops them)";
    }
    out.push_back("prepare: WARNING: " + std::to_string(s.dropped) + of + unit + " (" + percent(s.dropped, tokenized) + ")" +
                  what + "; e.g. " + positions(r.dropped_at, s.dropped) +
                  "\n---> HINT: raise data.max_seq_len (ptk prepare --max-seq-len), or shorten these records");
  }
  if (s.boundary_merged > 0)
    out.push_back("prepare: note: " + std::to_string(s.boundary_merged) + of + unit + " (" +
                  percent(s.boundary_merged, tokenized) +
                  ") would merge tokens across the prompt/completion boundary if encoded as one text (e.g. " +
                  positions(r.merged_at, s.boundary_merged) +
                  "); ptk encodes prompt and completion apart, as generation does, so every completion character is "
                  "trained (TRL encodes one text)");
  return out;
}

bool in_eval_split(uint64_t content_hash, double fraction) {
  const double u = static_cast<double>(splitmix64(content_hash ^ 0x7074'6b5f'6576'616cull) >> 11) * 0x1.0p-53;
  return u < fraction;
}

bool has_eval_data(const config::DataSection& data) { return !data.eval.empty() || data.eval_split > 0; }

PrepareOptions prepare_options_from_recipe(const config::DataSection& data, const config::TokenizerSection& tok,
                                           const config::ModelSection& model, int64_t seed, Format format, bool eval) {
  PrepareOptions o;
  o.format = format;
  o.sources = eval ? data.eval : data.train;
  o.sources_key = eval ? "data.eval" : "data.train";
  if (data.eval_split > 0 && data.eval.empty()) {  // both sides from data.train
    o.sources = data.train;
    o.sources_key = "data.train";
    o.split = eval ? PrepareOptions::Split::kEval : PrepareOptions::Split::kTrain;
    o.eval_split = data.eval_split;
  }
  for (const auto& [field, column] : data.columns) o.columns.emplace_back(field, column);
  o.tokenizer_path = tok.path.empty() ? model.path : tok.path;
  if (o.tokenizer_path.empty())
    throw Error("no tokenizer: tokenizer.path and model.path are both empty\n---> HINT: set tokenizer.path=DIR");
  o.chat_template = tok.chat_template.empty() ? "auto" : tok.chat_template;
  o.chat_template_kwargs = tok.chat_template_kwargs;
  o.max_seq_len = data.max_seq_len;
  o.packing = data.packing;
  o.on_error = data.on_error;
  o.seed = static_cast<uint64_t>(seed);
  return o;
}

std::string prepared_dir(const std::string& run_dir, const std::string& split) { return run_dir + "/data/" + split; }

std::string ensure_prepared(const PrepareOptions& options, const std::string& dir) {
  PrepareOptions o = options;
  o.force = false;
  return prepare(o, dir).dir;
}

}  // namespace ptk::data
