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
#include "datasets/inspect.h"
#include "datasets/loader.h"
#include "datasets/prepare.h"
#include "reward/rm_stage.h"
#include "rl/dpo_stage.h"
#include "rl/grpo_stage.h"
#include "sft/sft_stage.h"

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

// The training stage whose recipe `ptk prepare --recipe` reads: --stage, else the stage section the
// recipe has (sft, dpo, rm, grpo), else what --format names (preference: dpo, rl: grpo), else sft
// (an SFT recipe may have no `sft` section).
std::string stage_of(const cli::CommandLine& cl, const config::RecipeJson& rj, std::string* why) {
  if (cl.has("stage")) {
    *why = "--stage";
    return cl.get<std::string>("stage");
  }
  for (const char* s : {"sft", "dpo", "rm", "grpo", "rollout"}) {
    if (rj.doc.IsObject() && rj.doc.HasMember(s)) {
      *why = std::string("it has a `") + s + "` section";
      return std::string(s) == "rollout" ? "grpo" : s;
    }
  }
  if (cl.has("format")) {
    const std::string f = cl.get<std::string>("format");
    *why = "--format " + f;
    return f == "preference" ? "dpo" : f == "rl" ? "grpo" : "sft";
  }
  *why = "no dpo, rm or grpo section (--stage picks another)";
  return "sft";
}

}  // namespace

int cmd_prepare(int argc, char** argv) {
  // A stage recipe binds with its stage's sections; a data-only recipe or --input with these.
  sft::SftRecipe sft_recipe;
  rl::DpoRecipe dpo_recipe;
  reward::RmRecipe rm_recipe;
  rl::GrpoRecipe grpo_recipe;
  config::TrainingRecipe* stage_recipe = &sft_recipe;
  std::vector<config::Section*> sections = sft_recipe.all_sections();
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
      "<run.dir>/data (where stages look). Flags override the recipe's tokenizer and data keys.\n"
      "A stage recipe (ptk sft|dpo|rm|grpo's) is read whole and its data prepared as that stage prepares\n"
      "it (format; rm drops over-long pairs), so the stage finds it up to date: the stage is --stage,\n"
      "else the recipe's dpo/rm/grpo/sft section, else --format's (preference: dpo, rl: grpo), else sft.\n\n"
      "Formats: sft ({\"messages\"} | {\"prompt\",\"completion\"} | {\"text\"}), preference\n"
      "({\"prompt\",\"chosen\",\"rejected\"}, strings or message lists), rl ({\"prompt\",\"answer\",...}).\n"
      "Also read as they are: ShareGPT {\"conversations\": [{\"from\",\"value\"}]}, Alpaca {\"instruction\",\"input\",\n"
      "\"output\",\"system\",\"history\"}, preference pairs without \"prompt\" (TRL's extract_prompt); other names\n"
      "through data.columns={\"prompt\":\"question\"}. Files: JSONL, a JSON array, .gz of either, Parquet.\n"
      "data.eval_split=0.1 holds out a hashed 10% of data.train as OUT/eval (also with --input).\n"
      "Bad lines are reported as file:line: reason; data.on_error=skip lists them in DIR/skipped.txt.");
  cl.accept_recipe(sections);
  cl.accept_chat_template();
  cl.flags().add_options()
      ("stage", po::value<std::string>(), "sft | dpo | rm | grpo: the stage whose recipe --recipe is (default: from the recipe)")
      ("tokenizer", po::value<std::string>(), "HF folder with tokenizer.json, or the file (default: tokenizer.path, else model.path)")
      ("input", po::value<std::vector<std::string>>()->composing(), "data file (JSONL, JSON array, .gz of either, Parquet) or glob, optionally PATH:WEIGHT; repeat for several")
      ("output", po::value<std::string>(), "prepared folder (--input) or parent of train/ and eval/ (recipe)")
      ("format", po::value<std::string>()->default_value("sft"),
       "sft | preference | rl (what the stage reads; with a stage recipe: that stage's)")
      ("max-seq-len", po::value<int64_t>(), "tokens per row; same as data.max_seq_len")
      ("no-packing", po::bool_switch(), "one document per row, padded by the loader; same as data.packing=false")
      ("on-error", po::value<std::string>(), "fail | skip; same as data.on_error")
      ("overlong", po::value<std::string>()->default_value("truncate"),
       "records over max_seq_len: truncate | drop (rl prompts are always dropped; rm recipes drop); counted either way")
      ("force", po::bool_switch(), "rebuild even when the folder is up to date")
      ("quiet", po::bool_switch(), "no progress line")
      ("show", po::value<int64_t>()->default_value(0),
       "then print the first N rows decoded, trained tokens between [[ ]] (as ptk inspect-data --rows N)");
  if (!cl.parse(argc, argv)) return 0;

  config::RecipeJson rj = config::load_recipe(cl.recipe(), cl.overrides());
  std::string why;
  const std::string stage = stage_of(cl, rj, &why);
  if (stage == "dpo") stage_recipe = &dpo_recipe, sections = dpo_recipe.all_sections();
  else if (stage == "rm") stage_recipe = &rm_recipe, sections = rm_recipe.all_sections();
  else if (stage == "grpo") stage_recipe = &grpo_recipe, sections = grpo_recipe.all_sections();
  else if (stage != "sft")
    throw UsageError("ptk prepare: --stage " + stage + " is not one of sft | dpo | rm | grpo");
  config::bind_recipe(rj, sections);
  config::RunSection& run = stage_recipe->run;
  config::ModelSection& model = stage_recipe->model;
  config::TokenizerSection& tokenizer = stage_recipe->tokenizer;
  config::DataSection& data = stage_recipe->data;
  // What the stage itself passes to datasets/prepare (its run_<stage> and constructor).
  const data::Format stage_format =
      stage == "sft" ? data::Format::kSft : stage == "grpo" ? data::Format::kRl : data::Format::kPreference;
  const std::string stage_overlong = stage == "rm" ? "drop" : "truncate";
  if (cl.has("tokenizer")) tokenizer.path = cl.get<std::string>("tokenizer");
  if (cl.has("max-seq-len")) data.max_seq_len = cl.get<int64_t>("max-seq-len");
  if (cl.get<bool>("no-packing")) data.packing = false;
  if (cl.has("on-error")) data.on_error = cl.get<std::string>("on-error");
  const bool from_flags = cl.vm().count("input") > 0;
  const bool stage_recipe_given = !cl.recipe().empty() && !from_flags;
  const data::Format format = stage_recipe_given && !cl.has("format") ? stage_format
                                                                      : data::parse_format(cl.get<std::string>("format"));
  const std::string overlong = stage_recipe_given && !cl.has("overlong") ? stage_overlong : cl.get<std::string>("overlong");
  if (stage_recipe_given)
    std::printf("prepare: %s as a %s recipe (%s): %s data, over-long records %s\n", cl.recipe().c_str(), stage.c_str(),
                why.c_str(), stage_format == data::Format::kSft ? "sft" : stage_format == data::Format::kRl ? "rl" : "preference",
                overlong == "drop" ? "dropped" : "truncated");
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
  if (from_flags && data.eval_split <= 0) {
    jobs.push_back({false, out});
  } else {  // a recipe, or --input with data.eval_split: OUT/train and OUT/eval
    if (!data.train.empty()) jobs.push_back({false, out + "/train"});
    if (data::has_eval_data(data)) jobs.push_back({true, out + "/eval"});
  }
  for (const auto& job : jobs) {
    data::PrepareOptions o = data::prepare_options_from_recipe(data, tokenizer, model, run.seed, format, job.eval);
    o.overlong = overlong;
    o.threads = cl.threads();
    o.force = cl.get<bool>("force");
    o.quiet = cl.get<bool>("quiet");
    data::PrepareResult r = data::prepare(o, job.dir);
    if (o.quiet)  // prepare() printed nothing; the warnings about what is not trained still show
      for (const auto& w : data::prepare_warnings(o, r)) std::cerr << w << "\n";
    double mb = r.input_bytes / 1048576.0;
    std::printf("%s: %s%s\n", job.dir.c_str(), r.reused ? "up to date, reused: " : "", data::summary_line(r).c_str());
    if (!r.reused)
      std::printf("  %.1f MiB in %.2f s: %.1f MiB/s, %.0f tokens/s\n", mb, r.seconds, r.seconds > 0 ? mb / r.seconds : 0.0,
                  r.seconds > 0 ? r.summary.tokens / r.seconds : 0.0);
    if (cl.get<int64_t>("show") > 0) {
      data::InspectOptions io;
      io.rows = cl.get<int64_t>("show");
      std::fflush(stdout);
      data::inspect_rows(data::PreparedSet::open(job.dir), tokenizer::Tokenizer::load(o.tokenizer_path), io, std::cout);
      std::cout.flush();
    }
  }
  return 0;
}

}  // namespace ptk::app
