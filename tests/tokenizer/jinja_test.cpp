#include "core/tokenizer/jinja.h"

#include <gtest/gtest.h>

namespace {
TEST(Jinja, Placeholder) { EXPECT_EQ(ptk::jinja::Template::parse("a{{ 1 }}").render("{}").text, "a1"); }
}  // namespace
