// `ptk plot` through the binary: several runs into one SVG, metric lists, errors and exit codes.
#include <gtest/gtest.h>

#include <map>

#include "core/util/fs.h"
#include "tests/plot/xml_check.h"
#include "tests/support/test_util.h"

namespace ptk::plot {
namespace {

TEST(PlotCli, PlotsRunsToOneSvg) {
  test::TempDir d;
  std::string a = write_run(d, "runs/a", {{1, 3.0}, {2, 2.0}});
  std::string b = write_run(d, "runs/b", {{1, 3.5}, {2, 2.5}});
  auto r = test::run(test::ptk_binary() + " plot " + a + " " + b + "/metrics.jsonl --metric loss,lr --out " +
                     d.file("out/p.svg"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("2 charts, 2 runs"), std::string::npos) << r.out;
  std::string svg = read_file(d.file("out/p.svg"));
  std::map<std::string, int> counts;
  ASSERT_EQ(xml_problem(svg, &counts), "");
  EXPECT_EQ(count_of(svg, "class=\"series\""), 4);
  EXPECT_NE(svg.find("data-run=\"a\""), std::string::npos);
  EXPECT_NE(svg.find("data-run=\"b\""), std::string::npos);
  auto bad = test::run(test::ptk_binary() + " plot " + a + " --metric nope --out " + d.file("x.svg"));
  EXPECT_EQ(bad.exit_code, 1) << bad.out;
  EXPECT_NE(bad.out.find("available: loss, lr"), std::string::npos) << bad.out;
  auto none = test::run(test::ptk_binary() + " plot --out " + d.file("x.svg"));
  EXPECT_EQ(none.exit_code, 2) << none.out;
}

}  // namespace
}  // namespace ptk::plot
