// `ptk prepare`: JSONL data (a recipe's data.train/data.eval, or --input files) to tokenized, masked,
// packed shards with a manifest, reusing folders whose inputs did not change. Not training: stages
// call the same code (datasets/prepare.h) on their own when their shards are missing or stale.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "apps/ptk/cli.h"
#include "core/config/recipe.h"
#include "core/config/sections.h"
#include "core/util/error.h"
#include "datasets/prepare.h"

namespace po = boost::program_options;

namespace ptk::app {

namespace {

// "PATH" or "PATH:WEIGHT" (the part after the last ':' when it parses as a number).
config::DataSource parse_input(const std::string& s) {
  config::DataSource d{s, 1.0};
  size_t colon = s.rfind(':');
  if (colon != std::string::npos && colon + 1 < s.size()) {
    char* end = nullptr;
    double w = std::strtod(s.c_str() + colon + 1, &end);
    if (end && *end == '\0') {
      d.path = s.substr(0, colon);
      d.weight = w;
    }
  }
  return d;
}

}  // namespace

int cmd_prepare(int argc, char** argv) {
  config::RootSection root;
  config::RunSection run;
  config::ModelSection model;
  config::TokenizerSection tokenizer;
  config::DataSection data;
  cli::CommandLine cl(
      "prepare",
      "ptk prepare [--recipe FILE] [--tokenizer T] [--input F.jsonl[:WEIGHT] ...] [--output DIR] "
      "[--format sft|preference|rl] [--max-seq-len N] [key.path=value ...]",
      "Tokenizes JSONL data on every core into shards a training stage memory-maps: uint32 token ids, a\n"
      "per-token loss mask, a document index, packed rows (sft) and manifest.json (sources with sizes and\n"
      "SHA-256, tokenizer hash, counts, token totals). The same input gives identical bytes; an unchanged\n"
      "input reuses the folder (--force rebuilds). Stages run this themselves when their shards are missing\n"
      "or stale, so calling it first is optional.\n\n"
      "With --input: the files (globs allowed, PATH:WEIGHT for a mixing weight) go to --output DIR.\n"
      "With a recipe: data.train goes to OUT/train and data.eval to OUT/eval, OUT = --output or\n"
      "<run.dir>/data (where stages look). Flags override the recipe's tokenizer and data keys.\n\n"
      "Formats: sft ({\"messages\"} | {\"prompt\",\"completion\"} | {\"text\"}), preference\n"
      "({\"prompt\",\"chosen\",\"rejected\"}, strings or message lists), rl ({\"prompt\",\"answer\",...}).\n"
      "Bad lines are reported as file:line: reason; data.on_error=skip lists them in DIR/skipped.txt.");
  cl.accept_recipe({&root, &run, &model, &tokenizer, &data});
  cl.accept_chat_template();
  cl.flags().add_options()
      ("tokenizer", po::value<std::string>(), "HF folder with tokenizer.json, or the file (default: tokenizer.path, else model.path)")
      ("input", po::value<std::vector<std::string>>()->composing(), "JSONL file or glob, optionally PATH:WEIGHT; repeat for several")
      ("output", po::value<std::string>(), "prepared folder (--input) or parent of train/ and eval/ (recipe)")
      ("format", po::value<std::string>()->default_value("sft"), "sft | preference | rl (what the stage reads)")
      ("max-seq-len", po::value<int64_t>(), "tokens per row; same as data.max_seq_len")
      ("no-packing", po::bool_switch(), "one document per row, padded by the loader; same as data.packing=false")
      ("on-error", po::value<std::string>(), "fail | skip; same as data.on_error")
      ("overlong", po::value<std::string>()->default_value("truncate"),
       "records over max_seq_len: truncate | drop (rl prompts are always dropped); counted either way")
      ("force", po::bool_switch(), "rebuild even when the folder is up to date")
      ("quiet", po::bool_switch(), "no progress line");
  if (!cl.parse(argc, argv)) return 0;

  config::RecipeJson rj = config::load_recipe(cl.recipe(), cl.overrides());
  config::bind_recipe(rj, {&root, &run, &model, &tokenizer, &data});
  if (cl.has("tokenizer")) tokenizer.path = cl.get<std::string>("tokenizer");
  if (cl.has("max-seq-len")) data.max_seq_len = cl.get<int64_t>("max-seq-len");
  if (cl.get<bool>("no-packing")) data.packing = false;
  if (cl.has("on-error")) data.on_error = cl.get<std::string>("on-error");
  const data::Format format = data::parse_format(cl.get<std::string>("format"));
  const bool from_flags = cl.vm().count("input") > 0;
  if (from_flags) {
    data.train.clear();
    for (const auto& s : cl.get<std::vector<std::string>>("input")) data.train.push_back(parse_input(s));
    data.eval.clear();
  }
  if (data.train.empty() && data.eval.empty())
    throw UsageError("ptk prepare: no data: pass --input F.jsonl or a --recipe with data.train\n---> HINT: ptk prepare --help");

  std::string out;
  if (cl.has("output")) {
    out = cl.get<std::string>("output");
  } else if (from_flags) {
    throw UsageError("ptk prepare: --input needs --output DIR\n---> HINT: ptk prepare --help");
  } else {
    std::string run_dir = run.dir.empty() ? config::default_run_dir(cl.recipe()) : run.dir;
    out = run_dir + "/data";
  }

  struct Job {
    bool eval;
    std::string dir;
  };
  std::vector<Job> jobs;
  if (from_flags) {
    jobs.push_back({false, out});
  } else {
    if (!data.train.empty()) jobs.push_back({false, out + "/train"});
    if (!data.eval.empty()) jobs.push_back({true, out + "/eval"});
  }
  for (const auto& job : jobs) {
    data::PrepareOptions o = data::prepare_options_from_recipe(data, tokenizer, model, run.seed, format, job.eval);
    o.overlong = cl.get<std::string>("overlong");
    o.threads = cl.threads();
    o.force = cl.get<bool>("force");
    o.quiet = cl.get<bool>("quiet");
    data::PrepareResult r = data::prepare(o, job.dir);
    double mb = r.input_bytes / 1048576.0;
    std::printf("%s: %s%s\n", job.dir.c_str(), r.reused ? "up to date, reused: " : "", data::summary_line(r).c_str());
    if (!r.reused)
      std::printf("  %.1f MiB in %.2f s: %.1f MiB/s, %.0f tokens/s\n", mb, r.seconds, r.seconds > 0 ? mb / r.seconds : 0.0,
                  r.seconds > 0 ? r.summary.tokens / r.seconds : 0.0);
  }
  return 0;
}

}  // namespace ptk::app
