// `ptk plot RUN... [--metric NAME...] [--out FILE]`: curves of metrics from runs' metrics.jsonl as
// one standalone SVG (one chart per metric, one series per run). Not a dashboard: rerun to refresh.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "apps/ptk/cli.h"
#include "core/train/plot.h"
#include "core/util/error.h"
#include "core/util/fs.h"

namespace po = boost::program_options;

namespace ptk::app {
namespace {

// "runs/a/" -> "a"; "runs/a/metrics.jsonl" -> "a".
std::string run_name(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const std::string suffix = "/metrics.jsonl";
  if (p.size() > suffix.size() && p.compare(p.size() - suffix.size(), suffix.size(), suffix) == 0)
    p.resize(p.size() - suffix.size());
  size_t slash = p.rfind('/');
  return slash == std::string::npos ? p : p.substr(slash + 1);
}

}  // namespace

int cmd_plot(int argc, char** argv) {
  cli::CommandLine cl("plot", "ptk plot RUN... [--metric NAME...] [--out FILE]",
                      "Draws metrics of one or more runs as an SVG: one chart per metric, one curve per run.\n"
                      "RUN is a run folder (holding metrics.jsonl) or a metrics.jsonl file. Null values (NaN) are\n"
                      "gaps; a torn last line (a crash mid-write) is skipped.");
  cl.flags().add_options()
      ("metric", po::value<std::vector<std::string>>()->composing(),
       "metric to plot (repeat the flag or separate with commas: --metric loss,lr); default: loss")
      ("out", po::value<std::string>()->default_value("plot.svg"), "SVG file to write (atomically)");

  // Runs are positional; everything else goes to the flag parser (which takes no positionals here).
  std::vector<char*> flags = {argv[0]};
  std::vector<std::string> runs;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    bool takes_value = a == "--metric" || a == "--out" || a == "--threads";
    if (a.size() > 1 && a[0] == '-') {
      flags.push_back(argv[i]);
      if (takes_value && i + 1 < argc) flags.push_back(argv[++i]);
    } else {
      runs.push_back(a);
    }
  }
  if (!cl.parse(static_cast<int>(flags.size()), flags.data())) return 0;
  if (runs.empty()) throw UsageError("ptk plot: name at least one run folder\n---> HINT: ptk plot runs/demo-sft");

  std::vector<std::string> metrics;
  if (cl.vm().count("metric")) {
    for (const auto& m : cl.get<std::vector<std::string>>("metric")) {
      for (size_t p = 0; p <= m.size();) {
        size_t e = m.find(',', p);
        if (e == std::string::npos) e = m.size();
        if (e > p) metrics.push_back(m.substr(p, e - p));
        p = e + 1;
      }
    }
  }
  if (metrics.empty()) metrics = {"loss"};

  std::vector<plot::MetricsLog> logs;
  for (const auto& r : runs) {
    std::string name = run_name(r);
    for (const auto& l : logs)
      if (l.run == name) name = r;  // two runs with one folder name: show the paths as given
    logs.push_back(plot::read_metrics(r, name));
  }
  auto charts = plot::metric_charts(logs, metrics);
  const std::string out = cl.get<std::string>("out");
  std::string dir = parent_dir(out);
  if (!dir.empty() && dir != ".") make_dirs(dir);
  write_file_atomic(out, plot::render_svg(charts));
  std::printf("wrote %s: %zu chart%s, %zu run%s\n", out.c_str(), charts.size(), charts.size() == 1 ? "" : "s",
              logs.size(), logs.size() == 1 ? "" : "s");
  for (const auto& l : logs) std::printf("  %-24s %zu steps\n", l.run.c_str(), l.steps.size());
  return 0;
}

}  // namespace ptk::app
