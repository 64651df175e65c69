// Recipe loading: relaxed JSON, base inheritance, overrides, typed binding and error messages.
#include <gtest/gtest.h>
#include <tuple>
#include <vector>

#include "core/config/recipe.h"
#include "core/config/sections.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "tests/support/test_util.h"

namespace ptk::config {
namespace {

using test::TempDir;

// Binds and returns the error text ("" when it binds).
std::string bind_error(const std::string& path, const std::vector<std::string>& overrides, TrainingRecipe* r) {
  try {
    bind_recipe(load_recipe(path, overrides), r->sections());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Recipe, DefaultsWithoutFile) {
  TrainingRecipe r;
  EXPECT_EQ(bind_error("", {}, &r), "");
  EXPECT_DOUBLE_EQ(r.optim.lr, 1e-5);
  EXPECT_EQ(r.optim.schedule, "cosine");
  EXPECT_EQ(r.root.resume, "auto");
  ASSERT_EQ(r.optim.betas.size(), 2u);
  EXPECT_DOUBLE_EQ(r.optim.betas[1], 0.999);
}

TEST(Recipe, CommentsTrailingCommasAndBaseInheritance) {
  TempDir d;
  d.write("base.json", R"({
    // shared settings
    "optim": {"lr": 2e-5, "schedule": "linear", "betas": [0.9, 0.95],},
    /* block comment */
    "train": {"micro_batch_size": 4},
  })");
  std::string child = d.write("sub/child.json", R"({
    "base": "../base.json",
    "optim": {"lr": 7e-6},   // overrides only lr
    "data": {"train": ["a.jsonl", {"path": "b*.jsonl", "weight": 2}]},
  })");
  TrainingRecipe r;
  ASSERT_EQ(bind_error(child, {}, &r), "");
  EXPECT_DOUBLE_EQ(r.optim.lr, 7e-6);
  EXPECT_EQ(r.optim.schedule, "linear");  // from base
  EXPECT_DOUBLE_EQ(r.optim.betas[1], 0.95);
  EXPECT_EQ(r.train.micro_batch_size, 4);
  ASSERT_EQ(r.data.train.size(), 2u);
  EXPECT_EQ(r.data.train[1].path, "b*.jsonl");
  EXPECT_DOUBLE_EQ(r.data.train[1].weight, 2.0);
}

TEST(Recipe, OverridesOfEveryType) {
  TempDir d;
  std::string f = d.write("r.json", R"({"optim": {"lr": 1e-4}})");
  TrainingRecipe r;
  ASSERT_EQ(bind_error(f,
                       {"optim.lr=3e-5", "train.max_steps=12", "data.packing=false", "model.path=/m/x",
                        "optim.betas=[0.8,0.9]", "data.train=[\"x.jsonl\",\"y.jsonl\"]", "resume=never"},
                       &r),
            "");
  EXPECT_DOUBLE_EQ(r.optim.lr, 3e-5);
  EXPECT_EQ(r.train.max_steps, 12);
  EXPECT_FALSE(r.data.packing);
  EXPECT_EQ(r.model.path, "/m/x");
  EXPECT_DOUBLE_EQ(r.optim.betas[0], 0.8);
  ASSERT_EQ(r.data.train.size(), 2u);
  EXPECT_EQ(r.data.train[1].path, "y.jsonl");
  EXPECT_EQ(r.root.resume, "never");
}

TEST(Recipe, UnknownKeyNamesKeyFileAndNearest) {
  TempDir d;
  std::string f = d.write("r.json", R"({"optim": {"lrr": 1e-4}})");
  TrainingRecipe r;
  std::string err = bind_error(f, {}, &r);
  EXPECT_NE(err.find("unknown key optim.lrr"), std::string::npos) << err;
  EXPECT_NE(err.find(f), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean optim.lr?"), std::string::npos) << err;
}

TEST(Recipe, UnknownSectionSuggestsSection) {
  TempDir d;
  std::string f = d.write("r.json", R"({"optm": {"lr": 1e-4}})");
  TrainingRecipe r;
  std::string err = bind_error(f, {}, &r);
  EXPECT_NE(err.find("unknown key optm"), std::string::npos) << err;
  EXPECT_NE(err.find("did you mean optim?"), std::string::npos) << err;
}

TEST(Recipe, UnknownKeyFromBaseNamesTheBaseFile) {
  TempDir d;
  std::string base = d.write("base.json", R"({"train": {"grad_acum": 2}})");
  std::string f = d.write("r.json", R"({"base": "base.json", "optim": {"lr": 1e-4}})");
  TrainingRecipe r;
  std::string err = bind_error(f, {}, &r);
  EXPECT_NE(err.find(base + ": unknown key train.grad_acum (did you mean train.grad_accum?)"), std::string::npos)
      << err;
}

TEST(Recipe, UnknownKeyFromCommandLine) {
  TrainingRecipe r;
  std::string err = bind_error("", {"train.max_step=3"}, &r);
  EXPECT_NE(err.find("command line: unknown key train.max_step (did you mean train.max_steps?)"),
            std::string::npos)
      << err;
}

TEST(Recipe, WrongTypeNamesPathAndExpectedType) {
  TempDir d;
  std::string f = d.write("r.json", R"({"optim": {"lr": "fast"}, "train": {"micro_batch_size": 1.5},
                                        "data": {"packing": 1}})");
  TrainingRecipe r;
  std::string err = bind_error(f, {}, &r);
  EXPECT_NE(err.find("optim.lr: expected a number, got string \"fast\""), std::string::npos) << err;
  EXPECT_NE(err.find("train.micro_batch_size: expected an integer, got number 1.5"), std::string::npos) << err;
  EXPECT_NE(err.find("data.packing: expected a bool"), std::string::npos) << err;
  // All errors of the recipe come together.
  EXPECT_NE(err.find("3 errors in recipe"), std::string::npos) << err;
}

TEST(Recipe, BadChoiceSuggestsNearest) {
  TrainingRecipe r;
  std::string err = bind_error("", {"optim.schedule=cosin"}, &r);
  EXPECT_NE(err.find("optim.schedule: \"cosin\" is not one of constant | linear | cosine (did you mean \"cosine\"?)"),
            std::string::npos)
      << err;
}

TEST(Recipe, SectionMustBeObject) {
  TrainingRecipe r;
  std::string err = bind_error("", {"optim=3"}, &r);
  EXPECT_NE(err.find("optim: expected a section (object), got number"), std::string::npos) << err;
}

// A section with a required key, as stages declare them.
struct NeedsData : Section {
  std::vector<DataSource> train;
  std::string verifier;
  const char* name() const override { return "needs"; }
  const char* help() const override { return "test"; }
  void visit(Visitor& v) override {
    v.required(train, "train", "training files");
    v.required(verifier, "verifier", "answer checker name");
  }
};

TEST(Recipe, MissingRequiredKeysAreNamed) {
  NeedsData s;
  std::string err;
  try {
    bind_recipe(load_recipe("", {}), {&s});
  } catch (const Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("missing required key needs.train (training files)"), std::string::npos) << err;
  EXPECT_NE(err.find("missing required key needs.verifier"), std::string::npos) << err;
  EXPECT_NE(err.find("2 errors"), std::string::npos) << err;
}

TEST(Recipe, CrossFieldValidationQuotesValues) {
  TrainingRecipe r;
  std::string err = bind_error("", {"optim.lr=1e-5", "optim.min_lr=1e-4", "model.path=a", "model.config=b"}, &r);
  EXPECT_NE(err.find("optim.min_lr must be in [0, optim.lr]"), std::string::npos) << err;
  EXPECT_NE(err.find("model.path (\"a\") and model.config (\"b\") are exclusive"), std::string::npos) << err;
}

// TRL's convention: max_steps=-1 trains for the epochs, a positive value overrides them; 0 (which
// once trained a full epoch without a word) and anything below -1 are refused by name.
TEST(Recipe, MaxStepsIsMinusOneOrPositive) {
  TrainingRecipe r;
  EXPECT_EQ(bind_error("", {"train.max_steps=-1"}, &r), "");
  EXPECT_EQ(r.train.max_steps, -1);
  EXPECT_EQ(bind_error("", {"train.max_steps=7", "train.epochs=3"}, &r), "");
  EXPECT_EQ(r.train.max_steps, 7);
  for (const char* bad : {"0", "-2"}) {
    std::string err = bind_error("", {std::string("train.max_steps=") + bad}, &r);
    EXPECT_NE(err.find(std::string("train.max_steps must be -1 (train for train.epochs) or >= 1, got ") + bad),
              std::string::npos)
        << err;
    EXPECT_NE(err.find("1 error in recipe"), std::string::npos) << err;
  }
}

// train.sharding: none (default) | zero1 | zero2; train.zero1=true is the older spelling of zero1 and
// keeps meaning it, beside zero2 it is refused naming both keys; another mode is refused as a choice.
TEST(Recipe, ShardingModeAndTheOlderZeroOneSpelling) {
  TrainingRecipe r;
  EXPECT_EQ(bind_error("", {}, &r), "");
  EXPECT_EQ(r.train.sharding, "none");
  EXPECT_EQ(r.train.sharding_mode(), "none");
  EXPECT_EQ(bind_error("", {"train.zero1=true"}, &r), "");
  EXPECT_EQ(r.train.sharding_mode(), "zero1");
  EXPECT_EQ(bind_error("", {"train.zero1=true", "train.sharding=zero1"}, &r), "");
  EXPECT_EQ(r.train.sharding_mode(), "zero1");
  EXPECT_EQ(bind_error("", {"train.sharding=zero2"}, &r), "");
  EXPECT_EQ(r.train.sharding_mode(), "zero2");
  std::string err = bind_error("", {"train.zero1=true", "train.sharding=zero2"}, &r);
  EXPECT_NE(err.find("train.zero1=true (the older spelling of train.sharding=zero1) conflicts with "
                     "train.sharding=\"zero2\""),
            std::string::npos)
      << err;
  err = bind_error("", {"train.sharding=zero3"}, &r);
  EXPECT_NE(err.find("train.sharding"), std::string::npos) << err;
  EXPECT_NE(err.find("zero2"), std::string::npos) << err;  // the choices are listed
}

// checkpoint.max_shard_size reads sizes as transformers' max_shard_size does: KB/MB/GB are powers of 10,
// KiB/MiB/GiB of 2, a bare number is bytes; the default is transformers' 5GB.
TEST(Recipe, MaxShardSizeUnits) {
  TrainingRecipe r;
  EXPECT_EQ(bind_error("", {}, &r), "");
  EXPECT_EQ(r.checkpoint.max_shard_bytes(), 5000000000ull);
  const std::pair<const char*, uint64_t> ok[] = {{"20KB", 20000}, {"500MB", 500000000ull}, {"2GiB", 1ull << 31},
                                                 {"3KiB", 3072}, {"\"1234\"", 1234}, {"7B", 7}};
  for (const auto& [text, bytes] : ok) {
    EXPECT_EQ(bind_error("", {std::string("checkpoint.max_shard_size=") + text}, &r), "") << text;
    EXPECT_EQ(r.checkpoint.max_shard_bytes(), bytes) << text;
  }
  for (const char* bad : {"0GB", "5 GB", "GB", "5TB", "-1KB", "99999999999999999999"}) {
    std::string err = bind_error("", {std::string("checkpoint.max_shard_size=\"") + bad + "\""}, &r);
    EXPECT_NE(err.find("checkpoint.max_shard_size must be a positive size"), std::string::npos) << bad << ": " << err;
  }
}

// The README promises every error at once: range errors come with unknown keys and type errors.
TEST(Recipe, RangeErrorsComeWithUnknownKeys) {
  TempDir d;
  std::string f = d.write("r.json", R"({"optim": {"lrr": 1e-4, "warmup_steps": -3},
                                        "train": {"micro_batch_size": 0, "max_steps": 0},
                                        "data": {"max_seq_len": 1}})");
  TrainingRecipe r;
  std::string err = bind_error(f, {"train.grad_acum=2"}, &r);
  for (const char* want : {"unknown key optim.lrr (did you mean optim.lr?)",
                           "command line: unknown key train.grad_acum (did you mean train.grad_accum?)",
                           "optim.warmup_steps must be >= 0, got -3", "train.micro_batch_size must be >= 1, got 0",
                           "train.max_steps must be -1", "data.max_seq_len must be >= 2, got 1", "6 errors in recipe"})
    EXPECT_NE(err.find(want), std::string::npos) << want << "\n" << err;
}

// A range check about a key whose value was refused would judge the default instead of what the
// recipe said: it is left out, the others stay.
TEST(Recipe, RangeCheckOfARefusedKeyIsLeftOut) {
  TrainingRecipe r;
  std::string err = bind_error("", {"optim.lr=fast", "optim.min_lr=1", "train.log_every=0"}, &r);
  EXPECT_NE(err.find("optim.lr: expected a number, got string \"fast\""), std::string::npos) << err;
  EXPECT_EQ(err.find("optim.min_lr must be in"), std::string::npos) << err;  // it compares with optim.lr
  EXPECT_NE(err.find("train.log_every must be >= 1, got 0"), std::string::npos) << err;
  EXPECT_NE(err.find("2 errors in recipe"), std::string::npos) << err;
  // A section given as a non-object refuses all its keys.
  err = bind_error("", {"optim=3", "train.grad_accum=0"}, &r);
  EXPECT_NE(err.find("optim: expected a section (object), got number"), std::string::npos) << err;
  EXPECT_NE(err.find("train.grad_accum must be >= 1, got 0"), std::string::npos) << err;
  EXPECT_NE(err.find("2 errors in recipe"), std::string::npos) << err;
}

// A stage's cross-section checks (bind_recipe's extra_checks) are listed with the rest.
TEST(Recipe, ExtraChecksComeWithTheOtherErrors) {
  TrainingRecipe r;
  std::string err;
  try {
    bind_recipe(load_recipe("", {"optim.lrr=1", "train.micro_batch_size=3"}), r.sections(), [&](Errors& e) {
      if (r.train.micro_batch_size % 2 != 0)
        e.add("train.micro_batch_size = " + std::to_string(r.train.micro_batch_size) + " must be even here");
    });
  } catch (const Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("unknown key optim.lrr"), std::string::npos) << err;
  EXPECT_NE(err.find("train.micro_batch_size = 3 must be even here"), std::string::npos) << err;
  EXPECT_NE(err.find("2 errors in recipe"), std::string::npos) << err;
}

// A key set twice inside one file is refused with the file, both lines and the key's full path, for
// every repeat in every file of the base chain at once.
TEST(Recipe, DuplicateKeysNameFileLinesAndKey) {
  TempDir d;
  std::string base = d.write("base.json", "{\n  \"train\": {\"epochs\": 1,\n    \"epochs\": 2}\n}\n");
  std::string f = d.write("r.json",
                          "{\n"
                          "  \"base\": \"base.json\",\n"
                          "  \"optim\": {\n"
                          "    \"lr\": 1e-5,  // first\n"
                          "    \"lr\": 2e-5,\n"
                          "  },\n"
                          "  \"data\": {\"train\": [\"a.jsonl\", {\"path\": \"b.jsonl\", \"path\": \"c.jsonl\"}]},\n"
                          "  /* a comment */ \"optim\": {\"eps\": 1e-6},\n"
                          "}\n");
  TrainingRecipe r;
  std::string err = bind_error(f, {}, &r);
  EXPECT_NE(err.find("4 duplicate keys in recipe " + f), std::string::npos) << err;
  EXPECT_NE(err.find(f + ":5: duplicate key optim.lr (first on line 4)"), std::string::npos) << err;
  EXPECT_NE(err.find(f + ":7: duplicate key data.train[1].path (first on line 7)"), std::string::npos) << err;
  EXPECT_NE(err.find(f + ":8: duplicate key optim (first on line 3)"), std::string::npos) << err;
  EXPECT_NE(err.find(base + ":3: duplicate key train.epochs (first on line 2)"), std::string::npos) << err;
  // load_recipe alone refuses it (pipeline and sweep recipes are not bound to sections).
  EXPECT_THROW(load_recipe(f, {}), Error);
}

// Setting a key again in a child of a `base`, and again (twice) on the command line, is layering.
TEST(Recipe, RepeatsAcrossBaseAndOverridesAreLayering) {
  TempDir d;
  d.write("base.json", R"({"optim": {"lr": 1e-5}, "train": {"grad_accum": 4}})");
  // The same leaf name in two objects is no repeat either (pipeline recipes have such sections).
  std::string f = d.write("p.json", R"({"base": "base.json", "optim": {"lr": 2e-5}, "x": {"lr": 1}})");
  EXPECT_NO_THROW(load_recipe(f, {"optim.lr=3e-5", "optim.lr=4e-5"}));
  TrainingRecipe r;
  std::string f2 = d.write("r.json", R"({"base": "base.json", "optim": {"lr": 2e-5}})");
  ASSERT_EQ(bind_error(f2, {"optim.lr=3e-5", "optim.lr=4e-5"}, &r), "");
  EXPECT_DOUBLE_EQ(r.optim.lr, 4e-5);
  EXPECT_EQ(r.train.grad_accum, 4);
}

TEST(Recipe, InvalidJsonReportsLineAndColumn) {
  TempDir d;
  std::string f = d.write("r.json", "{\n  \"optim\": {\"lr\": 1e-4\n}\n");
  TrainingRecipe r;
  std::string err = bind_error(f, {}, &r);
  EXPECT_NE(err.find(f + ":4:1: invalid JSON"), std::string::npos) << err;
}

// A recipe (or its base) nested 1M levels deep is refused at the bracket past json::kMaxDepth with
// file:line:col (it used to overflow the stack); a deep override value is a usage error; a recipe
// path that is a folder or a FIFO is named as such (a folder used to read as "The document is empty").
TEST(Recipe, DeepJsonFoldersAndFifosAreRefusedByName) {
  TempDir d;
  const std::string deep(1000000, '[');
  std::string f = d.write("deep.json", "{\n  // a comment\n  \"optim\": {\"betas\": " + deep + "}}\n");
  TrainingRecipe r;
  EXPECT_EQ(bind_error(f, {}, &r), f + ":3:" + std::to_string(22 + 510) + ": invalid JSON: nested deeper than 512 levels");
  std::string child = d.write("child.json", "{\"base\": \"deep.json\"}");
  EXPECT_EQ(bind_error(child, {}, &r), f + ":3:532: invalid JSON: nested deeper than 512 levels");
  try {
    load_recipe("", {"optim.betas=" + deep + std::string(1000000, ']')});
    ADD_FAILURE() << "a 1M-level override was accepted";
  } catch (const UsageError& e) {
    EXPECT_EQ(std::string(e.what()), "override `optim.betas`: invalid JSON: nested deeper than 512 levels");
  }
  // Within the limit an override is still JSON when it parses.
  EXPECT_EQ(bind_error("", {"optim.betas=[0.8, 0.9]"}, &r), "");
  EXPECT_DOUBLE_EQ(r.optim.betas[0], 0.8);

  make_dirs(d.file("folder.json"));
  EXPECT_EQ(bind_error(d.file("folder.json"), {}, &r), "cannot open " + d.file("folder.json") + ": is a directory, not a regular file");
  std::string fifo = test::make_fifo(d.file("fifo.json"));
  EXPECT_EQ(test::error_within([&] { load_recipe(fifo, {}); }, fifo), "cannot open " + fifo + ": is a FIFO, not a regular file");
}

TEST(Recipe, BaseCycleAndMissingBase) {
  TempDir d;
  d.write("a.json", R"({"base": "b.json"})");
  std::string b = d.write("b.json", R"({"base": "a.json"})");
  TrainingRecipe r;
  EXPECT_NE(bind_error(b, {}, &r).find("recipe base cycle"), std::string::npos);
  std::string c = d.write("c.json", R"({"base": "nope.json"})");
  EXPECT_NE(bind_error(c, {}, &r).find("nope.json, which does not exist"), std::string::npos);
}

TEST(Recipe, MalformedOverride) {
  TrainingRecipe r;
  EXPECT_NE(bind_error("", {"optim.lr"}, &r).find("not of the form key.path=value"), std::string::npos);
  EXPECT_NE(bind_error("", {"optim..lr=1"}, &r).find("empty key component"), std::string::npos);
}

TEST(Recipe, ResolvedRecipeRoundTrips) {
  TrainingRecipe a;
  ASSERT_EQ(bind_error("", {"optim.lr=3e-5", "data.train=x.jsonl", "run.seed=7"}, &a), "");
  std::string resolved = resolved_json(a.sections());
  TempDir d;
  std::string f = d.write("resolved.json", resolved);
  TrainingRecipe b;
  ASSERT_EQ(bind_error(f, {}, &b), "") << resolved;
  EXPECT_EQ(resolved_json(b.sections()), resolved);
  EXPECT_DOUBLE_EQ(b.optim.lr, 3e-5);
  EXPECT_EQ(b.run.seed, 7);
  EXPECT_EQ(b.data.train.at(0).path, "x.jsonl");
}

TEST(Recipe, HelpListsEveryKey) {
  TrainingRecipe r;
  std::ostringstream os;
  print_help(os, r.sections());
  for (auto& k : all_keys(r.sections())) EXPECT_NE(os.str().find("  " + k), std::string::npos) << k;
  EXPECT_NE(os.str().find("constant|linear|cosine"), std::string::npos);
}

// `name[i]` in an override reaches into a list the recipe has (how a pipeline's stage overrides are
// changed from the command line); indices past the list, lists the recipe lacks and indexing a
// non-list are refused with the override quoted. The indexed leaf is recorded as the command line's.
TEST(Recipe, OverrideIndexesIntoAList) {
  TempDir d;
  std::string f = d.write("p.json", R"({"stages": [{"name": "a", "overrides": {"train.max_steps": 9}},
                                                   {"name": "b", "model_from": "a@step-9"}],
                                        "grid": {"lr": [[1, 2], [3, 4]]}})");
  RecipeJson j = load_recipe(f, {"stages[1].model_from=a@step-2", "stages[0].overrides.train.max_steps=3",
                                 "stages[1].eval=false", "grid.lr[1][0]=5"});
  const auto& st = j.doc["stages"];
  EXPECT_EQ(std::string(st[1]["model_from"].GetString()), "a@step-2");
  EXPECT_FALSE(st[1]["eval"].GetBool());
  EXPECT_EQ(std::string(st[1]["name"].GetString()), "b");
  EXPECT_EQ(st[0]["overrides"]["train.max_steps"].GetInt(), 9);        // the file's dotted key stays,
  EXPECT_EQ(st[0]["overrides"]["train"]["max_steps"].GetInt(), 3);     // the override nests after it
  EXPECT_EQ(j.doc["grid"]["lr"][1][0].GetInt(), 5);
  EXPECT_EQ(j.doc["grid"]["lr"][1][1].GetInt(), 4);
  EXPECT_EQ(j.origin.at("stages[1].model_from"), "command line");
  EXPECT_EQ(j.origin.at("stages"), f);

  auto error = [&](const std::string& ov) {
    try {
      load_recipe(f, {ov});
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error("stages[2].eval=false").find("override `stages[2].eval=false`: stages has 2 entries (indices 0 to 1)"),
            std::string::npos);
  EXPECT_NE(error("runs[0].x=1").find("the recipe has no list runs to index"), std::string::npos);
  EXPECT_NE(error("grid[0]=1").find("grid is a object in the recipe, not a list"), std::string::npos)
      << error("grid[0]=1");
  EXPECT_NE(error("stages[0].name.x=1").find("name is a string in the recipe, not a section"), std::string::npos);
  EXPECT_NE(error("grid.lr[0].x=1").find("lr[0] is a array in the recipe, not an object"), std::string::npos)
      << error("grid.lr[0].x=1");
  for (std::string bad : {"stages[x].eval=1", "stages[].eval=1", "stages[0.eval=1", "[0].eval=1", "stages[0]x=1"})
    EXPECT_NE(error(bad).find("is not a key or key[index] (e.g. stages[0])"), std::string::npos) << bad << ": " << error(bad);
}

TEST(Recipe, DefaultRunDirIsRecipeName) {
  EXPECT_EQ(default_run_dir("recipes/tiny/sft.json"), "runs/sft");
  EXPECT_EQ(default_run_dir(""), "runs/adhoc");
}

}  // namespace
}  // namespace ptk::config

namespace ptk::config {
namespace {

// issue 26: a TRL user's key names, at the top level, inside a section and on the command line,
// get ptk's key (and what differs in kind); a TRL name whose ptk key this command lacks gets none.
TEST(Recipe, TrlKeyNamesSuggestPtkKeys) {
  test::TempDir d;
  std::string f = d.write("r.json", R"({"learning_rate": 2e-5, "gradient_accumulation_steps": 4,
    "train": {"per_device_train_batch_size": 2, "num_train_epochs": 3, "lr_scheduler_type": "cosine"},
    "optim": {"warmup_ratio": 0.1, "max_grad_norm": 1.0}, "output_dir": "out", "logging_steps": 10,
    "bf16": true, "max_length": 1024, "beta": 0.1})");
  TrainingRecipe r;
  std::string err;
  try {
    bind_recipe(load_recipe(f, {"save_steps=100", "train.seed=3"}), r.sections());
  } catch (const Error& e) {
    err = e.what();
  }
  for (const char* want : {
           "unknown key learning_rate (did you mean optim.lr? TRL's learning_rate is ptk's optim.lr)",
           "unknown key gradient_accumulation_steps (did you mean train.grad_accum?",
           "unknown key train.per_device_train_batch_size (did you mean train.micro_batch_size?",
           "unknown key train.num_train_epochs (did you mean train.epochs?",
           "unknown key train.lr_scheduler_type (did you mean optim.schedule?",
           "unknown key optim.warmup_ratio (did you mean optim.warmup_steps? TRL's warmup_ratio is ptk's "
           "optim.warmup_steps: a step count, not a ratio",
           "unknown key optim.max_grad_norm (did you mean optim.clip_grad_norm?",
           "unknown key output_dir (did you mean run.dir?", "unknown key logging_steps (did you mean train.log_every?",
           "unknown key bf16 (did you mean model.dtype?", "unknown key max_length (did you mean data.max_seq_len?",
           "command line: unknown key save_steps (did you mean checkpoint.every?",
           "command line: unknown key train.seed (did you mean run.seed?"})
    EXPECT_NE(err.find(want), std::string::npos) << want << "\n" << err;
  // `beta` is dpo.beta or grpo.beta: an SFT recipe has neither, so no TRL hint names one.
  EXPECT_NE(err.find("unknown key beta"), std::string::npos) << err;
  EXPECT_EQ(err.find("dpo.beta"), std::string::npos) << err;
}

// A choice listing "true" and "false" (dpo.precompute_ref_log_probs: auto | true | false) takes
// JSON booleans and writes them back as booleans, as the bool key it replaced did.
struct TriState : Section {
  std::string mode;
  const char* name() const override { return "s"; }
  const char* help() const override { return "test"; }
  void visit(Visitor& v) override { v.choice(mode, "mode", "auto", {"auto", "true", "false"}, "help"); }
};

TEST(Recipe, ChoiceWithTrueFalseTakesBooleans) {
  for (const auto& [override_text, want, written] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"s.mode=false", "false", "\"mode\": false"}, {"s.mode=true", "true", "\"mode\": true"},
           {"s.mode=auto", "auto", "\"mode\": \"auto\""}}) {
    TriState s;
    bind_recipe(load_recipe("", {override_text}), {&s});
    EXPECT_EQ(s.mode, want);
    EXPECT_NE(resolved_json({&s}).find(written), std::string::npos) << resolved_json({&s});
  }
  TriState s;
  std::string err;
  try {
    bind_recipe(load_recipe("", {"s.mode=1"}), {&s});
  } catch (const Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("s.mode: expected one of auto | true | false"), std::string::npos) << err;
}

// data.columns (an object of strings) and data.eval_split: bound from a file and from overrides
// (whole object or one key), written back into the resolved recipe, refused with the key named.
TEST(Recipe, DataColumnsAndEvalSplit) {
  TempDir d;
  std::string f = d.write("r.json", R"({"data": {"train": "t.jsonl", "columns": {"prompt": "question"}}})");
  TrainingRecipe r;
  ASSERT_EQ(bind_error(f, {"data.columns.completion=solution", "data.eval_split=0.1"}, &r), "");
  EXPECT_EQ(r.data.columns, (std::map<std::string, std::string>{{"prompt", "question"}, {"completion", "solution"}}));
  EXPECT_DOUBLE_EQ(r.data.eval_split, 0.1);
  const std::string resolved = resolved_json(r.sections());
  TempDir d2;
  TrainingRecipe again;  // the resolved recipe (the run folder's config.json) binds to the same values
  ASSERT_EQ(bind_error(d2.write("resolved.json", resolved), {}, &again), "") << resolved;
  EXPECT_EQ(again.data.columns, r.data.columns);
  EXPECT_DOUBLE_EQ(again.data.eval_split, 0.1);
  TrainingRecipe bad;
  std::string e = bind_error(f, {"data.columns={\"prompt\": 3}"}, &bad);
  EXPECT_NE(e.find("data.columns: expected an object of strings"), std::string::npos) << e;
  e = bind_error(f, {"data.columns={\"promt\": \"q\"}"}, &bad);
  EXPECT_NE(e.find("data.columns.promt: \"promt\" is not a field ptk reads"), std::string::npos) << e;
  e = bind_error(f, {"data.eval_split=1"}, &bad);
  EXPECT_NE(e.find("data.eval_split must be a fraction in [0, 1)"), std::string::npos) << e;
}

}  // namespace
}  // namespace ptk::config
