// `ptk inspect-data`: prepared rows decoded back to text with the loss mask marked, so a user sees
// exactly what a stage trains on (datasets/inspect.h). From a prepared folder, or from a stage
// recipe (its data prepared as the stage would, into a temporary folder unless the run folder's is
// up to date). Reads; never changes a run folder.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
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

namespace po = boost::program_options;

namespace ptk::app {

namespace {

// The stage a recipe is for, from its stage section ("sft", "dpo", "rm", "grpo"); "" when none.
std::string recipe_stage(const config::RecipeJson& rj) {
  std::string found;
  for (const char* s : {"sft", "dpo", "rm", "grpo"}) {
    if (!rj.doc.HasMember(s)) continue;
    if (!found.empty())
      throw UsageError("ptk inspect-data: the recipe has both \"" + found + "\" and \"" + s +
                       "\" sections\n---> HINT: pass --format sft|preference|rl");
    found = s;
  }
  return found;
}

bool stdout_is_tty() { return ::isatty(STDOUT_FILENO) == 1 && std::getenv("NO_COLOR") == nullptr; }

}  // namespace

int cmd_inspect_data(int argc, char** argv) {
  config::RootSection root;
  config::RunSection run;
  config::ModelSection model;
  config::TokenizerSection tokenizer;
  config::DataSection data;
  cli::CommandLine cl(
      "inspect-data",
      "ptk inspect-data --data PREPARED_DIR [--tokenizer T] [--rows N] [--start K] [--tokens] [--color auto|always|never]\n"
      "       ptk inspect-data --recipe STAGE_RECIPE [--split train|eval] [--format F] [key.path=value ...] [flags above]",
      "Prints prepared rows decoded back to text with the loss mask marked: what a stage trains on.\n"
      "Trained tokens (mask 1) are shown between [[ and ]] (in green on a terminal, --color), with token\n"
      "counts per row and document. A document's first token is never trained (nothing predicts it).\n"
      "  sft: each row's documents (several in a packed row, each with its file:line), prompt and\n"
      "       completion, chat turns, EOS;\n"
      "  preference (dpo, rm): the prompt (not trained), then chosen and rejected;\n"
      "  rl (grpo): the prompt as the policy sees it (never trained) and the record's other fields.\n"
      "--tokens puts | between tokens (e.g. to see '.M'|'aking' at a prompt/completion boundary).\n\n"
      "--data: a folder `ptk prepare` (or a stage) wrote, e.g. <run.dir>/data/train; the tokenizer is the\n"
      "one it was prepared with (manifest.json), or --tokenizer.\n"
      "--recipe: a stage recipe (sft, dpo, rm, grpo; the stage is read from its section, or --format).\n"
      "Its data.train (--split eval: data.eval) is prepared as that stage prepares it, with prepare's\n"
      "truncation and drop warnings; <run.dir>/data/<split> is read when it is up to date, else a\n"
      "temporary folder is used and removed: nothing in the run folder is written.");
  cl.accept_recipe({&root, &run, &model, &tokenizer, &data});
  cl.flags().add_options()
      ("data", po::value<std::string>(), "prepared folder to read (instead of --recipe)")
      ("tokenizer", po::value<std::string>(), "HF folder with tokenizer.json, or the file (default: the prepared folder's; "
                                               "with --recipe: tokenizer.path, else model.path)")
      ("rows", po::value<int64_t>()->default_value(3), "rows to show (sft rows, preference pairs, rl prompts)")
      ("start", po::value<int64_t>()->default_value(0), "first row to show (0-based, in stored order)")
      ("split", po::value<std::string>()->default_value("train"), "with --recipe: train (data.train) | eval (data.eval)")
      ("format", po::value<std::string>(), "with --recipe: sft | preference | rl (default: from the recipe's stage section)")
      ("tokens", po::bool_switch(), "mark every token boundary with |")
      ("color", po::value<std::string>()->default_value("auto"), "auto (on a terminal, unless NO_COLOR is set) | always | never");
  if (!cl.parse(argc, argv)) return 0;

  data::InspectOptions io;
  io.rows = cl.get<int64_t>("rows");
  io.start = cl.get<int64_t>("start");
  io.tokens = cl.get<bool>("tokens");
  if (io.rows < 0 || io.start < 0) throw UsageError("ptk inspect-data: --rows and --start must be >= 0");
  const std::string color = cl.get<std::string>("color");
  if (color != "auto" && color != "always" && color != "never")
    throw UsageError("ptk inspect-data: --color must be auto | always | never, got `" + color + "`");
  io.color = color == "always" || (color == "auto" && stdout_is_tty());

  const bool from_dir = cl.has("data");
  if (from_dir == !cl.recipe().empty())
    throw UsageError("ptk inspect-data: give either --data PREPARED_DIR or --recipe STAGE_RECIPE\n---> HINT: ptk inspect-data --help");
  if (from_dir && !cl.overrides().empty())
    throw UsageError("ptk inspect-data: key.path=value overrides go with --recipe, not --data");

  std::string dir, tok_path, tmp;
  data::PrepareOptions po;
  if (from_dir) {
    dir = cl.get<std::string>("data");
  } else {
    config::RecipeJson rj = config::load_recipe(cl.recipe(), cl.overrides());
    const std::string stage = recipe_stage(rj);
    // Only the sections preparation reads are bound; the stage's own keys are its command's to check.
    config::RecipeJson shared;
    shared.file = rj.file;
    shared.origin = rj.origin;
    for (const char* s : {"run", "model", "tokenizer", "data"})
      if (rj.doc.HasMember(s)) shared.doc.AddMember(rapidjson::Value(s, shared.doc.GetAllocator()),
                                                    rapidjson::Value(rj.doc[s], shared.doc.GetAllocator()),
                                                    shared.doc.GetAllocator());
    config::bind_recipe(shared, {&root, &run, &model, &tokenizer, &data});
    data::Format format = data::Format::kSft;
    if (cl.has("format")) {
      format = data::parse_format(cl.get<std::string>("format"));
    } else if (stage == "dpo" || stage == "rm") {
      format = data::Format::kPreference;
    } else if (stage == "grpo") {
      format = data::Format::kRl;
    } else if (stage.empty() && (rj.doc.HasMember("stages") || rj.doc.HasMember("reward"))) {
      throw UsageError("ptk inspect-data: " + cl.recipe() + " is not a stage recipe (sft, dpo, rm or grpo)\n---> HINT: "
                       "pass a stage's recipe (a pipeline's stages name theirs), or --data with a prepared folder");
    }
    const std::string split = cl.get<std::string>("split");
    if (split != "train" && split != "eval") throw UsageError("ptk inspect-data: --split must be train | eval, got `" + split + "`");
    if ((split == "train" ? data.train : data.eval).empty())
      throw UsageError("ptk inspect-data: data." + split + " is empty in " + cl.recipe() + "\n---> HINT: set data." + split +
                       "=[\"file.jsonl\"]");
    po = data::prepare_options_from_recipe(data, tokenizer, model, run.seed, format, split == "eval");
    if (stage == "rm") po.overlong = "drop";  // as `ptk rm` prepares (TRL's RewardTrainer drops long pairs)
    po.threads = cl.threads();
    const std::string run_dir = run.dir.empty() ? config::default_run_dir(cl.recipe()) : run.dir;
    dir = data::prepared_dir(run_dir, split);
    if (data::is_fresh(po, dir)) {
      std::cerr << "inspect-data: " << dir << " is up to date: reading it\n";
      data::prepare(po, dir);  // reuses it: prints the summary and prepare's warnings again
    } else {
      std::error_code ec;
      std::string base = std::filesystem::temp_directory_path(ec).string();
      if (ec || base.empty()) base = "/tmp";
      tmp = base + "/ptk-inspect-" + std::to_string(::getpid());
      std::cerr << "inspect-data: " << dir << " is missing or not up to date for this recipe: preparing " << split
                << " data into " << tmp << " (removed after)\n";
      dir = tmp + "/" + split;
      data::prepare(po, dir);
    }
    tok_path = po.tokenizer_path;
  }
  struct Cleanup {
    std::string path;
    ~Cleanup() {
      if (path.empty()) return;
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  } cleanup{tmp};

  data::PreparedSet set = data::PreparedSet::open(dir);
  if (cl.has("tokenizer")) tok_path = cl.get<std::string>("tokenizer");
  if (tok_path.empty()) tok_path = data::manifest_tokenizer_path(set);
  if (tok_path.empty())
    throw UsageError("ptk inspect-data: " + dir + "/manifest.json names no tokenizer\n---> HINT: pass --tokenizer DIR "
                     "(the one the folder was prepared with)");
  tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(tok_path);
  data::inspect_rows(set, tok, io, std::cout);
  std::cout.flush();
  return 0;
}

}  // namespace ptk::app
