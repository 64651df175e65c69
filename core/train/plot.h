// Line charts of training metrics as standalone SVG: read runs' metrics.jsonl, one chart per metric,
// one series per run with a legend, ticked axes. What `ptk plot` and each stage's report.md use.
// Not a plotting library: no log axes, no PNG (any browser or converter renders the SVG). Pure
// functions, no shared state: safe from any thread.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ptk::plot {

// One run's metrics.jsonl: `steps[i]` and, per metric, `values[name][i]` (NaN where the line had
// null or lacked the metric).
struct MetricsLog {
  std::string run;  // legend name
  std::vector<int64_t> steps;
  std::map<std::string, std::vector<double>> values;
  // Metric names in first-seen order ("step" excluded).
  std::vector<std::string> names;
};

// Reads `path` (a metrics.jsonl, or a run folder holding one). A torn last line (a crash mid-write)
// is skipped; any other line that is not a JSON object with an integer "step" throws ptk::Error
// naming file:line. Non-numeric values (strings, arrays) are ignored.
MetricsLog read_metrics(const std::string& path, const std::string& run_name);

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;  // (x, y); a NaN/Inf y is a gap, never drawn
};

struct Chart {
  std::string title;
  std::string x_label = "step";
  std::string y_label;
  std::vector<Series> series;
};

// One chart per metric, one series per run (runs lacking the metric contribute an empty series, so
// colours match across charts). Throws ptk::Error when a metric is in none of the runs, listing the
// metrics that are.
std::vector<Chart> metric_charts(const std::vector<MetricsLog>& runs, const std::vector<std::string>& metrics);

// A standalone SVG document: the charts stacked top to bottom, each `width` x `height` pixels.
// Each series is one <path class="series"> (gaps become new sub-paths), isolated points get a
// <circle>, and the legend lists every series of the chart.
std::string render_svg(const std::vector<Chart>& charts, int width = 760, int height = 360);

// For report.md: writes `run_dir`/plots/<metric>.svg for each of `metrics` present in the run's
// metrics.jsonl and returns the markdown that embeds them ("![loss](plots/loss.svg)\n" ...);
// metrics the run lacks are left out; "" when none is present.
std::string write_report_plots(const std::string& run_dir, const std::vector<std::string>& metrics);

}  // namespace ptk::plot
