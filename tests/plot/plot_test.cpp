// SVG plots of metrics.jsonl: well-formed XML (checked by a small parser here), one series per run,
// null/NaN points as gaps, torn last lines, errors and report embedding (`ptk plot`: plot_cli_test.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <regex>
#include <vector>

#include "core/train/metrics.h"
#include "core/train/plot.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "tests/plot/xml_check.h"
#include "tests/support/test_util.h"

namespace ptk::plot {
namespace {

TEST(XmlChecker, CatchesBrokenDocuments) {
  std::map<std::string, int> c;
  EXPECT_EQ(xml_problem("<svg><g></g></svg>", &c), "");
  EXPECT_NE(xml_problem("<svg><g></svg>", &c), "");
  EXPECT_NE(xml_problem("<svg a=\"1\" a=\"2\"/>", &c), "");
  EXPECT_NE(xml_problem("<svg>a & b</svg>", &c), "");
  EXPECT_NE(xml_problem("<svg/><svg/>", &c), "");
  EXPECT_NE(xml_problem("<svg a=1/>", &c), "");
}

TEST(Plot, ReadsMetricsNullsAndTornLastLine) {
  test::TempDir d;
  std::string run = write_run(d, "a", {{1, 2.0}, {2, std::nan("")}, {3, 1.0}}, "{\"step\":4,\"lo");
  auto log = read_metrics(run, "a");
  ASSERT_EQ(log.steps, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(log.names, (std::vector<std::string>{"loss", "lr"}));
  EXPECT_DOUBLE_EQ(log.values["loss"][0], 2.0);
  EXPECT_TRUE(std::isnan(log.values["loss"][1]));
  // A bad line that is not the last is an error naming the line.
  std::string bad = d.write("bad/metrics.jsonl", "{\"step\":1,\"loss\":1}\nnot json\n{\"step\":2,\"loss\":1}\n");
  try {
    read_metrics(d.file("bad"), "bad");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("metrics.jsonl:2:"), std::string::npos) << e.what();
  }
}

TEST(Plot, ValidSvgOneSeriesPerRunNullsAreGaps) {
  test::TempDir d;
  std::vector<MetricsLog> runs = {
      read_metrics(write_run(d, "base", {{1, 3.0}, {2, 2.5}, {3, 2.0}, {4, 1.8}}), "base"),
      read_metrics(write_run(d, "beta<0.1>&", {{1, 3.1}, {2, std::nan("")}, {3, 2.2}, {4, 1.5}}), "beta<0.1>&"),
      read_metrics(write_run(d, "c", {{2, 2.9}, {4, 2.1}}), "c"),
  };
  std::string svg = render_svg(metric_charts(runs, {"loss", "lr"}));
  std::map<std::string, int> counts;
  ASSERT_EQ(xml_problem(svg, &counts), "") << svg;
  EXPECT_EQ(counts["svg"], 1);
  EXPECT_EQ(counts["path"], 6);  // 2 charts x 3 runs
  EXPECT_EQ(count_of(svg, "class=\"series\""), 6);
  EXPECT_EQ(count_of(svg, "class=\"legend\""), 6);
  EXPECT_NE(svg.find("beta&lt;0.1&gt;&amp;"), std::string::npos);  // names escaped
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
  // Run 2's loss path: steps 1 | gap | 3, 4 -> two sub-paths, three points; its step 1 is a lone point.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("data-run=\"beta&lt;0.1&gt;&amp;\" d=\"([^\"]*)\"")));
  std::string path = m[1];
  EXPECT_EQ(count_of(path, "M"), 2) << path;
  EXPECT_EQ(count_of(path, "L"), 1) << path;
  EXPECT_GE(counts["circle"], 1);
  // Tick labels: the x axis covers steps 1..4.
  EXPECT_NE(svg.find(">4</text>"), std::string::npos);
  EXPECT_NE(svg.find(">loss</text>"), std::string::npos);
}

TEST(Plot, IdenticalInputIdenticalBytes) {
  test::TempDir d;
  auto log = read_metrics(write_run(d, "a", {{1, 3.0}, {2, 2.0}}), "a");
  EXPECT_EQ(render_svg(metric_charts({log}, {"loss"})), render_svg(metric_charts({log}, {"loss"})));
}

TEST(Plot, UnknownMetricListsAvailable) {
  test::TempDir d;
  auto log = read_metrics(write_run(d, "a", {{1, 3.0}}), "a");
  try {
    metric_charts({log}, {"reward"});
    FAIL();
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("metric `reward`"), std::string::npos) << m;
    EXPECT_NE(m.find("available: loss, lr"), std::string::npos) << m;
  }
}

TEST(Plot, ConstantAndEmptyChartsStayFinite) {
  Chart flat{"flat", "step", "v", {{"r", {{0, 5.0}, {10, 5.0}}}}};
  Chart none{"none", "step", "v", {{"r", {{0, std::nan("")}}}}};
  std::string svg = render_svg({flat, none});
  std::map<std::string, int> counts;
  ASSERT_EQ(xml_problem(svg, &counts), "") << svg;
  EXPECT_EQ(svg.find("nan"), std::string::npos) << svg;
  EXPECT_NE(svg.find("no finite values"), std::string::npos);
}

TEST(Plot, ReportPlotsForPresentMetrics) {
  test::TempDir d;
  std::string run = write_run(d, "r", {{1, 2.0}, {2, 1.0}});
  std::string md = write_report_plots(run, {"loss", "reward/math", "lr"});
  EXPECT_EQ(md, "![loss](plots/loss.svg)\n![lr](plots/lr.svg)\n");
  std::map<std::string, int> counts;
  EXPECT_EQ(xml_problem(read_file(run + "/plots/loss.svg"), &counts), "");
}

}  // namespace
}  // namespace ptk::plot
