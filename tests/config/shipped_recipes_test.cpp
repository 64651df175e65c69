// Every file under recipes/ — found by walking the folder, so a new recipe is covered without
// editing this test — is validated by the command that reads it, through that command's own code:
//   stage recipes (sft/dpo/rm/grpo, by file name)  ptk <stage> --check        load, `base` chain, keys,
//                                                                              values, cross-field rules
//   reward-server recipes (a "reward" section)     ptk reward-server --check  the same, and verifier names
//   pipeline specs ("stages")                      ptk pipeline --dry-run     spec reader, then every stage's
//                                                                              and reward server's --check
//   sweeps and ablations ("grid" / "runs")         ptk sweep --dry-run        sweep reader, then every run's --check
//   HF model configs ("model_type")                ptk sft --check model.config=FILE (checkpoint::parse_config)
// None of these reads weights or data. A file none of them fits fails the test. Then the paths the
// recipes name: models and data either made by a shipped step (a stage recipe's run folder, make-data's
// output) or the user's own (models/..., data/...), listed in the test's output.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <regex>
#include <set>

#include "core/config/recipe.h"
#include "core/config/sections.h"  // default_run_dir
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/text.h"

namespace ptk {
namespace {

namespace fs = std::filesystem;
using rapidjson::Value;

const std::vector<std::string> kStages = {"sft", "dpo", "rm", "grpo"};
const std::string kValid = " is valid (--check: nothing was run)";

enum class Kind { kStage, kRewardServer, kPipeline, kSweep, kModelConfig, kUnknown };

struct Shipped {
  std::string rel;      // "recipes/tiny/sft.json": relative to the repository root, where recipes run
  Kind kind = Kind::kUnknown;
  std::string command;  // kStage: sft | dpo | rm | grpo
  rapidjson::Document doc;
};

bool has(const Value& v, const char* key) { return v.IsObject() && v.HasMember(key); }

// Every regular file under recipes/, sorted, with what reads it.
std::vector<Shipped> shipped_recipes() {
  std::vector<Shipped> out;
  const std::string root = test::source_dir();
  for (auto& e : fs::recursive_directory_iterator(root + "/recipes")) {
    if (!e.is_regular_file()) continue;
    Shipped s;
    s.rel = fs::relative(e.path(), root).string();
    if (e.path().extension() == ".json") {
      s.doc = json::parse_file(e.path().string(), json::Syntax::kRelaxed);
      const std::string stem = e.path().stem().string();
      if (has(s.doc, "stages")) s.kind = Kind::kPipeline;
      else if (has(s.doc, "grid") || has(s.doc, "runs")) s.kind = Kind::kSweep;
      else if (has(s.doc, "reward")) s.kind = Kind::kRewardServer;
      else if (has(s.doc, "model_type")) s.kind = Kind::kModelConfig;
      else
        for (auto& c : kStages)
          if (stem == c || stem.rfind(c + "-", 0) == 0) {  // sft.json, sft-base.json
            s.kind = Kind::kStage;
            s.command = c;
          }
    }
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(), [](const Shipped& a, const Shipped& b) { return a.rel < b.rel; });
  return out;
}

using test::count;

// Commands run in a scratch folder that sees the repository's recipes/ (a link): recipe paths are
// relative to the folder ptk runs in, and a dry run may create runs/ there.
class ShippedRecipes : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directory_symlink(test::source_dir() + "/recipes", d_.file("recipes"));
  }
  test::RunResult ptk(const std::string& args) {
    return test::run("cd '" + d_.path() + "' && " + test::ptk_binary() + " " + args);
  }
  test::TempDir d_;
};

TEST_F(ShippedRecipes, EveryRecipeValidatesThroughItsCommand) {
  auto all = shipped_recipes();
  std::map<Kind, int> seen;
  for (auto& s : all) {
    SCOPED_TRACE(s.rel);
    ++seen[s.kind];
    switch (s.kind) {
      case Kind::kStage: {
        auto r = ptk(s.command + " --check --recipe " + s.rel);
        EXPECT_EQ(r.exit_code, 0) << r.out;
        EXPECT_NE(r.out.find(s.command + ": " + s.rel + kValid), std::string::npos) << r.out;
        break;
      }
      case Kind::kRewardServer: {
        auto r = ptk("reward-server --check --recipe " + s.rel);
        EXPECT_EQ(r.exit_code, 0) << r.out;
        EXPECT_NE(r.out.find("reward-server: " + s.rel + kValid), std::string::npos) << r.out;
        break;
      }
      case Kind::kModelConfig: {
        auto r = ptk("sft --check model.config=" + s.rel);
        EXPECT_EQ(r.exit_code, 0) << r.out;
        EXPECT_NE(r.out.find("sft: the recipe" + kValid), std::string::npos) << r.out;
        break;
      }
      case Kind::kPipeline: {
        // One --check per stage, plus one per reward server the pipeline starts itself.
        size_t checks = 0;
        for (auto& st : s.doc["stages"].GetArray())
          checks += 1 + (has(st, "reward_server") && has(st["reward_server"], "recipe"));
        auto r = ptk("pipeline --dry-run --recipe " + s.rel);
        EXPECT_EQ(r.exit_code, 0) << r.out;
        EXPECT_EQ(count(r.out, kValid), checks) << r.out;
        EXPECT_EQ(r.out.find("invalid recipe"), std::string::npos) << r.out;
        break;
      }
      case Kind::kSweep: {
        size_t runs = has(s.doc, "runs") ? s.doc["runs"].Size() : 1;
        if (has(s.doc, "grid"))
          for (auto it = s.doc["grid"].MemberBegin(); it != s.doc["grid"].MemberEnd(); ++it) runs *= it->value.Size();
        auto r = ptk("sweep --dry-run --recipe " + s.rel);
        EXPECT_EQ(r.exit_code, 0) << r.out;
        EXPECT_EQ(count(r.out, kValid), runs) << r.out;
        break;
      }
      case Kind::kUnknown:
        ADD_FAILURE() << s.rel << ": this test does not know which command reads it; teach shipped_recipes() "
                      << "(tests/config/shipped_recipes_test.cpp) how to validate it";
        break;
    }
  }
  // The walk found the folder's kinds (a broken walk must not pass by checking nothing).
  EXPECT_GE(seen[Kind::kStage], 18);
  EXPECT_GE(seen[Kind::kPipeline], 1);
  EXPECT_GE(seen[Kind::kSweep], 2);
  EXPECT_GE(seen[Kind::kRewardServer], 1);
  EXPECT_GE(seen[Kind::kModelConfig], 1);
}

// The checks above can fail: --check and the dry runs refuse what the stage would refuse at run time.
TEST_F(ShippedRecipes, ChecksRefuseWhatTheStagesWouldRefuse) {
  auto grpo = ptk("grpo --check --recipe recipes/tiny/grpo.json 'grpo.reward_funcs=[\"maht\", \"format_answer\"]'");
  EXPECT_EQ(grpo.exit_code, 1) << grpo.out;
  EXPECT_NE(grpo.out.find("unknown verifier `maht` (did you mean `math`?)"), std::string::npos) << grpo.out;
  EXPECT_EQ(grpo.out.find(kValid), std::string::npos) << grpo.out;

  // A pipeline stage's override and its reward server's, each refused in the dry run; the stages
  // that are fine still pass.
  auto pipe = ptk("pipeline --dry-run --recipe recipes/tiny/pipeline.json 'stages[3].overrides.grpo.scale_rewards=groupp' "
                  "'stages[3].reward_server.overrides.reward.verifiers=[\"exactt\", \"math\"]'");
  EXPECT_EQ(pipe.exit_code, 1) << pipe.out;
  EXPECT_NE(pipe.out.find("grpo.scale_rewards"), std::string::npos) << pipe.out;
  EXPECT_NE(pipe.out.find("unknown verifier `exactt`"), std::string::npos) << pipe.out;
  EXPECT_NE(pipe.out.find("| grpo | grpo | invalid recipe |"), std::string::npos) << pipe.out;
  EXPECT_EQ(count(pipe.out, kValid), 3u) << pipe.out;  // sft, dpo, rm

  auto sweep = ptk("sweep --dry-run --recipe recipes/ablations/dpo_beta_loss.json overrides.dpo.ld_alpha=2");
  EXPECT_EQ(sweep.exit_code, 1) << sweep.out;
  EXPECT_NE(sweep.out.find("dpo.ld_alpha"), std::string::npos) << sweep.out;
  EXPECT_NE(sweep.out.find("sweep: 6 of 6 runs have an invalid recipe"), std::string::npos) << sweep.out;

  // A model config whose heads do not divide its hidden size.
  std::string cfg = read_file(test::source_dir() + "/recipes/tiny/model.json");
  size_t at = cfg.find("\"num_attention_heads\": 4");
  ASSERT_NE(at, std::string::npos) << cfg;
  d_.write("bad_model.json", cfg.replace(at, 24, "\"num_attention_heads\": 5"));
  auto model = ptk("sft --check model.config=bad_model.json");
  EXPECT_EQ(model.exit_code, 1) << model.out;
  EXPECT_NE(model.out.find("num_attention_heads"), std::string::npos) << model.out;
}

// The paths a string value names, by key; data sources may be strings or {"path": ...}.
std::vector<std::pair<std::string, std::string>> named_paths(const Value& doc, Kind kind) {
  std::vector<std::pair<std::string, std::string>> out;
  auto str = [&](const char* section, const char* key) {
    if (has(doc, section) && has(doc[section], key) && doc[section][key].IsString() &&
        doc[section][key].GetStringLength() > 0)
      out.push_back({std::string(section) + "." + key, doc[section][key].GetString()});
  };
  if (kind == Kind::kRewardServer) {
    str("reward", "model");
    return out;
  }
  if (kind == Kind::kPipeline || kind == Kind::kSweep) {
    str("eval", "data");
    if (has(doc, "setup"))
      for (auto& s : doc["setup"].GetArray())
        if (has(s, "creates")) out.push_back({"setup[].creates", s["creates"].GetString()});
    return out;
  }
  str("model", "path");
  str("model", "config");
  str("tokenizer", "path");
  str("dpo", "ref_path");
  for (const char* section : {"sft", "dpo", "rm", "grpo"}) str(section, "eval_prompts");
  for (const char* key : {"train", "eval"})
    if (has(doc, "data") && has(doc["data"], key))
      for (auto& src : doc["data"][key].GetArray())
        out.push_back({std::string("data.") + key, src.IsString() ? src.GetString() : src["path"].GetString()});
  return out;
}

// What a recipe names is there when it runs: a model.config in the repository; a model under runs/
// is the final/ (or a kept checkpoint) of a shipped recipe's run folder, of a stage that makes that
// kind of model; data/arith/... is a file make-data writes. The rest is the user's (models/<HF folder>,
// their own data/), listed. In recipes/qwen2.5-<size>/ every path naming a size names that one.
TEST_F(ShippedRecipes, ModelAndDataPathsAreShippedOrMadeByAShippedStep) {
  auto all = shipped_recipes();
  // make-data's files at the tiny recipes' command, fewer problems (the sizes do not change the files).
  auto made = ptk("make-data arithmetic --out data/arith --tokenizer bytes --train 16 --eval 8");
  ASSERT_EQ(made.exit_code, 0) << made.out;

  // Run folders of the shipped stage recipes, and which command writes each.
  std::map<std::string, std::string> writer_of;  // run dir -> command
  std::map<std::string, std::string> recipe_of;  // run dir -> recipe
  std::vector<std::pair<Shipped*, config::RecipeJson>> loaded;
  for (auto& s : all) {
    if (s.kind != Kind::kStage && s.kind != Kind::kRewardServer && s.kind != Kind::kPipeline && s.kind != Kind::kSweep)
      continue;
    config::RecipeJson j = config::load_recipe(test::source_dir() + "/" + s.rel, {});  // with its base chain
    if (s.kind == Kind::kStage) {
      std::string dir = has(j.doc, "run") && has(j.doc["run"], "dir") ? j.doc["run"]["dir"].GetString()
                                                                      : config::default_run_dir(s.rel);
      EXPECT_EQ(recipe_of.count(dir), 0u) << s.rel << " and " << recipe_of[dir] << " both write " << dir
                                          << " (a run folder is the recipe's file name unless run.dir is set)";
      writer_of[dir] = s.command;
      recipe_of[dir] = s.rel;
    }
    loaded.push_back({&s, std::move(j)});
  }

  const std::regex size_re("qwen2\\.5-([0-9.]+b)", std::regex::icase);
  auto size_of = [&](const std::string& p) {
    std::smatch m;
    if (!std::regex_search(p, m, size_re)) return std::string();
    std::string v = m[1];
    std::transform(v.begin(), v.end(), v.begin(), ::tolower);
    return v;
  };
  std::set<std::string> users;
  for (auto& [s, j] : loaded) {
    SCOPED_TRACE(s->rel);
    const std::string folder_size = size_of(s->rel);
    auto paths = named_paths(j.doc, s->kind);
    if (has(j.doc, "run") && has(j.doc["run"], "dir")) paths.push_back({"run.dir", j.doc["run"]["dir"].GetString()});
    for (auto& [key, p] : paths) {
      if (!folder_size.empty() && !size_of(p).empty()) {
        EXPECT_EQ(size_of(p), folder_size) << key << " = " << p << " names another size than its folder";
      }
      if (key == "run.dir") continue;
      if (key == "model.config") {
        EXPECT_TRUE(path_exists(test::source_dir() + "/" + p)) << key << " = " << p << " is not in the repository";
      } else if (p.rfind("runs/", 0) == 0) {
        // <run dir>/final or <run dir>/checkpoints/step-N of a shipped recipe.
        static const std::regex out_re("(runs/.+)/(final|checkpoints/step-[0-9]+)");
        std::smatch m;
        if (!std::regex_match(p, m, out_re)) {
          ADD_FAILURE() << key << " = " << p << ": not a run's final/ or checkpoints/step-N";
          continue;
        }
        const std::string dir = m[1].str();
        auto w = writer_of.find(dir);
        if (w == writer_of.end()) {
          ADD_FAILURE() << key << " = " << p << ": no shipped recipe writes " << dir;
          continue;
        }
        // A reward model comes from ptk rm; a policy (model.path, dpo.ref_path) from sft, dpo or grpo.
        EXPECT_EQ(w->second == "rm", key == "reward.model")
            << key << " = " << p << " is written by " << recipe_of[dir] << " (ptk " << w->second << ")";
      } else if (p == "data/arith" || p.rfind("data/arith/", 0) == 0) {
        EXPECT_TRUE(path_exists(d_.file(p))) << key << " = " << p << " is not among make-data arithmetic's files";
      } else if (p.rfind("models/", 0) == 0 || p.rfind("data/", 0) == 0) {
        users.insert(p + "  (" + key + ", " + s->rel + ")");
      } else {
        ADD_FAILURE() << key << " = " << p << ": neither made by a shipped step nor under models/ or data/";
      }
    }
  }
  // The user's own: HF folders (ptk never downloads; the recipe comments say so) and datasets (the
  // recipe comments give the format). Listed so a reader sees what a run needs from outside.
  std::string list;
  for (auto& u : users) list += "\n  " + u;
  std::printf("paths the user provides:%s\n", list.c_str());
  EXPECT_FALSE(users.empty());
}

}  // namespace
}  // namespace ptk
