// SVG line charts of metrics.jsonl (see plot.h). Hand-written SVG: a few elements per chart, so no
// plotting dependency and byte-identical output for identical input.
#include "core/train/plot.h"

#include <rapidjson/document.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::plot {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// matplotlib's tab10: distinct, colour-blind tolerable.
constexpr const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v) {  // coordinates: 2 decimals are plenty at screen resolution
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", v);
  return b;
}

std::string tick_label(double v, double step) {
  if (std::fabs(v) < step * 1e-9) v = 0;  // -0 and rounding noise
  char b[32];
  double a = std::fabs(v);
  if (a != 0 && (a >= 1e6 || a < 1e-3)) {
    std::snprintf(b, sizeof b, "%.3g", v);
  } else {
    int decimals = step >= 1 ? 0 : std::min(6, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
    std::snprintf(b, sizeof b, "%.*f", decimals, v);
  }
  return b;
}

// About `target` round ticks (1, 2, 5 x 10^k) covering [lo, hi]; widens [lo, hi] to whole ticks.
// `integer`: no ticks between whole numbers (steps are integers).
std::vector<double> nice_ticks(double* lo, double* hi, int target, bool integer, double* step_out) {
  double span = *hi - *lo;
  double raw = span / target;
  double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double norm = raw / mag;
  double step = (norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10) * mag;
  if (integer) step = std::max(step, 1.0);
  *lo = std::floor(*lo / step + 1e-9) * step;
  *hi = std::ceil(*hi / step - 1e-9) * step;
  std::vector<double> t;
  for (double v = *lo; v <= *hi + step * 1e-6; v += step) t.push_back(v);
  *step_out = step;
  return t;
}

void render_chart(std::ostringstream& o, const Chart& c, double y0, int width, int height) {
  const double left = 78, right = 170, top = 36, bottom = 52;
  const double pw = width - left - right, ph = height - top - bottom;
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  for (const auto& s : c.series)
    for (auto [x, y] : s.points) {
      if (!std::isfinite(y) || !std::isfinite(x)) continue;
      xmin = std::min(xmin, x), xmax = std::max(xmax, x);
      ymin = std::min(ymin, y), ymax = std::max(ymax, y);
    }
  bool empty = !std::isfinite(xmin);
  bool integer_x = true;
  for (const auto& s : c.series)
    for (auto [x, y] : s.points) integer_x = integer_x && (!std::isfinite(x) || x == std::floor(x));
  if (empty) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
  if (xmax == xmin) xmin -= 1, xmax += 1;
  if (ymax == ymin) {
    double pad = std::max(std::fabs(ymin) * 0.05, 1e-3);
    ymin -= pad, ymax += pad;
  }
  double xstep, ystep;
  auto xt = nice_ticks(&xmin, &xmax, 6, integer_x, &xstep);
  auto yt = nice_ticks(&ymin, &ymax, 5, false, &ystep);
  auto X = [&](double x) { return left + (x - xmin) / (xmax - xmin) * pw; };
  auto Y = [&](double y) { return y0 + top + (1 - (y - ymin) / (ymax - ymin)) * ph; };

  o << "<g class=\"chart\">\n";
  o << "<text x=\"" << num(left + pw / 2) << "\" y=\"" << num(y0 + 22)
    << "\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">" << xml_escape(c.title) << "</text>\n";
  o << "<rect x=\"" << num(left) << "\" y=\"" << num(y0 + top) << "\" width=\"" << num(pw) << "\" height=\"" << num(ph)
    << "\" fill=\"none\" stroke=\"#444\"/>\n";
  for (double t : xt) {
    o << "<line x1=\"" << num(X(t)) << "\" y1=\"" << num(y0 + top) << "\" x2=\"" << num(X(t)) << "\" y2=\""
      << num(y0 + top + ph) << "\" stroke=\"#e5e5e5\"/>\n";
    o << "<text class=\"xtick\" x=\"" << num(X(t)) << "\" y=\"" << num(y0 + top + ph + 16)
      << "\" text-anchor=\"middle\" font-size=\"11\">" << tick_label(t, xstep) << "</text>\n";
  }
  for (double t : yt) {
    o << "<line x1=\"" << num(left) << "\" y1=\"" << num(Y(t)) << "\" x2=\"" << num(left + pw) << "\" y2=\"" << num(Y(t))
      << "\" stroke=\"#e5e5e5\"/>\n";
    o << "<text class=\"ytick\" x=\"" << num(left - 6) << "\" y=\"" << num(Y(t) + 4)
      << "\" text-anchor=\"end\" font-size=\"11\">" << tick_label(t, ystep) << "</text>\n";
  }
  o << "<text x=\"" << num(left + pw / 2) << "\" y=\"" << num(y0 + height - 12)
    << "\" text-anchor=\"middle\" font-size=\"12\">" << xml_escape(c.x_label) << "</text>\n";
  o << "<text x=\"16\" y=\"" << num(y0 + top + ph / 2) << "\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 16 "
    << num(y0 + top + ph / 2) << ")\">" << xml_escape(c.y_label) << "</text>\n";
  if (empty)
    o << "<text x=\"" << num(left + pw / 2) << "\" y=\"" << num(y0 + top + ph / 2)
      << "\" text-anchor=\"middle\" font-size=\"12\" fill=\"#888\">no finite values</text>\n";

  for (size_t i = 0; i < c.series.size(); ++i) {
    const auto& s = c.series[i];
    const char* color = kColors[i % (sizeof kColors / sizeof kColors[0])];
    std::string d;
    std::vector<std::pair<double, double>> lone;  // points with no finite neighbour
    bool pen_down = false;
    for (size_t k = 0; k < s.points.size(); ++k) {
      auto [x, y] = s.points[k];
      if (!std::isfinite(x) || !std::isfinite(y)) {
        pen_down = false;
        continue;
      }
      bool next_ok = k + 1 < s.points.size() && std::isfinite(s.points[k + 1].second) && std::isfinite(s.points[k + 1].first);
      if (!pen_down && !next_ok) lone.push_back({x, y});
      d += (pen_down ? " L" : (d.empty() ? "M" : " M")) + num(X(x)) + " " + num(Y(y));
      pen_down = true;
    }
    o << "<path class=\"series\" data-run=\"" << xml_escape(s.name) << "\" d=\"" << d << "\" fill=\"none\" stroke=\""
      << color << "\" stroke-width=\"1.6\" stroke-linejoin=\"round\"/>\n";
    for (auto [x, y] : lone)
      o << "<circle cx=\"" << num(X(x)) << "\" cy=\"" << num(Y(y)) << "\" r=\"2.5\" fill=\"" << color << "\"/>\n";
    double ly = y0 + top + 14 + 18 * static_cast<double>(i);
    o << "<line class=\"legend\" x1=\"" << num(left + pw + 12) << "\" y1=\"" << num(ly - 4) << "\" x2=\""
      << num(left + pw + 32) << "\" y2=\"" << num(ly - 4) << "\" stroke=\"" << color << "\" stroke-width=\"2.5\"/>\n";
    o << "<text x=\"" << num(left + pw + 37) << "\" y=\"" << num(ly) << "\" font-size=\"11\">" << xml_escape(s.name)
      << "</text>\n";
  }
  o << "</g>\n";
}

}  // namespace

MetricsLog read_metrics(const std::string& path_in, const std::string& run_name) {
  std::string path = path_in;
  if (path_exists(path + "/metrics.jsonl")) path += "/metrics.jsonl";
  if (!path_exists(path))
    throw Error("no metrics at " + path_in + " (expected a run folder with metrics.jsonl, or the file itself)");
  std::string text = read_file(path);
  MetricsLog log;
  log.run = run_name;
  std::vector<std::string> lines;
  for (size_t p = 0; p < text.size();) {
    size_t e = text.find('\n', p);
    if (e == std::string::npos) e = text.size();
    lines.push_back(text.substr(p, e - p));
    p = e + 1;
  }
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string& line = lines[i];
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    rapidjson::Document d;
    bool ok = json::parse_into<rapidjson::kParseNanAndInfFlag>(d, line).ok() && d.IsObject() && d.HasMember("step") &&
              d["step"].IsInt64();
    if (!ok) {
      if (i + 1 == lines.size()) break;  // torn last line: the writer crashed mid-line
      throw Error(path + ":" + std::to_string(i + 1) +
                  ": not a metrics line (a JSON object with an integer \"step\")\n---> HINT: metrics.jsonl "
                  "is written by ptk, one object a line; only the last line can be torn by a crash");
    }
    size_t row = log.steps.size();
    log.steps.push_back(d["step"].GetInt64());
    for (auto& m : d.GetObject()) {
      std::string name(m.name.GetString(), m.name.GetStringLength());
      if (name == "step" || !(m.value.IsNumber() || m.value.IsNull())) continue;
      auto it = log.values.find(name);
      if (it == log.values.end()) {
        it = log.values.emplace(name, std::vector<double>(row, kNaN)).first;
        log.names.push_back(name);
      }
      it->second.resize(row, kNaN);
      it->second.push_back(m.value.IsNull() ? kNaN : m.value.GetDouble());
    }
    for (auto& [name, v] : log.values) v.resize(row + 1, kNaN);
  }
  return log;
}

std::vector<Chart> metric_charts(const std::vector<MetricsLog>& runs, const std::vector<std::string>& metrics) {
  std::vector<Chart> charts;
  for (const auto& metric : metrics) {
    Chart c;
    c.title = metric;
    c.y_label = metric;
    bool found = false;
    for (const auto& r : runs) {
      Series s;
      s.name = r.run;
      auto it = r.values.find(metric);
      if (it != r.values.end()) {
        found = true;
        for (size_t i = 0; i < r.steps.size(); ++i)
          s.points.push_back({static_cast<double>(r.steps[i]), it->second[i]});
      }
      c.series.push_back(std::move(s));
    }
    if (!found) {
      std::vector<std::string> have;
      for (const auto& r : runs)
        for (const auto& n : r.names)
          if (std::find(have.begin(), have.end(), n) == have.end()) have.push_back(n);
      std::string list;
      for (const auto& n : have) list += (list.empty() ? "" : ", ") + n;
      throw Error("metric `" + metric + "` is in none of the runs' metrics.jsonl\n---> HINT: available: " +
                  (list.empty() ? std::string("(none: the runs logged no steps yet)") : list));
    }
    charts.push_back(std::move(c));
  }
  return charts;
}

std::string render_svg(const std::vector<Chart>& charts, int width, int height) {
  std::ostringstream o;
  int total = height * static_cast<int>(std::max<size_t>(charts.size(), 1));
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << total << "\" viewBox=\"0 0 "
    << width << " " << total << "\" font-family=\"sans-serif\">\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (size_t i = 0; i < charts.size(); ++i) render_chart(o, charts[i], static_cast<double>(height) * i, width, height);
  o << "</svg>\n";
  return o.str();
}

std::string write_report_plots(const std::string& run_dir, const std::vector<std::string>& metrics) {
  MetricsLog log = read_metrics(run_dir, "run");
  std::string md;
  for (const auto& m : metrics) {
    if (!log.values.count(m)) continue;
    std::string safe = m;  // "reward/math" -> "reward_math"
    for (char& ch : safe)
      if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '_' && ch != '-') ch = '_';
    std::string file = "plots/" + safe + ".svg";
    make_dirs(run_dir + "/plots");
    write_file_atomic(run_dir + "/" + file, render_svg(metric_charts({log}, {m})));
    md += "![" + m + "](" + file + ")\n";
  }
  return md;
}

}  // namespace ptk::plot
