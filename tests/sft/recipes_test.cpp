// Every SFT recipe shipped in recipes/ loads and validates (base chains, keys, types, cross-field
// rules) — a typo in a shipped recipe fails here, not on a user's machine.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/config/recipe.h"
#include "sft/sft_stage.h"
#include "tests/support/test_util.h"

namespace ptk::sft {
namespace {

TEST(Recipes, EverySftRecipeBinds) {
  int n = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(test::source_dir() + "/recipes")) {
    if (e.path().filename() != "sft.json") continue;
    SftRecipe r;
    EXPECT_NO_THROW(config::bind_recipe(config::load_recipe(e.path().string(), {}), r.all_sections()))
        << e.path();
    ++n;
  }
  EXPECT_GE(n, 8) << "recipes/tiny and recipes/qwen2.5-{0.5b,...,72b}";
}

TEST(Recipes, QwenSftRecipesCarryTheReportSettings) {
  SftRecipe r;
  config::bind_recipe(config::load_recipe(test::source_dir() + "/recipes/qwen2.5-7b/sft.json", {}), r.all_sections());
  EXPECT_EQ(r.data.max_seq_len, 32768);
  EXPECT_EQ(r.train.epochs, 2);
  EXPECT_DOUBLE_EQ(r.optim.lr, 7e-6);
  EXPECT_DOUBLE_EQ(r.optim.min_lr, 7e-7);
  EXPECT_DOUBLE_EQ(r.optim.weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(r.optim.clip_grad_norm, 1.0);
}

TEST(Recipes, EveryLoraSftRecipeBindsWithLoraOn) {
  int n = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(test::source_dir() + "/recipes")) {
    if (e.path().filename() != "sft-lora.json") continue;
    SftRecipe r;
    EXPECT_NO_THROW(config::bind_recipe(config::load_recipe(e.path().string(), {}), r.all_sections())) << e.path();
    EXPECT_TRUE(r.lora.enabled) << e.path();
    EXPECT_EQ(r.lora.rank, 16) << e.path();
    EXPECT_EQ(r.lora.targets, std::vector<std::string>{"all-linear"}) << e.path();
    EXPECT_TRUE(r.model.activation_checkpointing) << e.path();
    ++n;
  }
  EXPECT_EQ(n, 7) << "recipes/qwen2.5-{0.5b,1.5b,3b,7b,14b,32b,72b}/sft-lora.json";
}

}  // namespace
}  // namespace ptk::sft
