// `ptk sweep --recipe FILE [key.path=value ...]`: one stage recipe under a grid or list of
// overrides, compared in a table and overlaid curves (pipeline/sweep.h).
// Not the sweep logic itself: flags, then run_sweep.
#include "apps/ptk/cli.h"
#include "core/util/error.h"
#include "pipeline/child_process.h"
#include "pipeline/sweep.h"

namespace po = boost::program_options;

namespace ptk::app {

int cmd_sweep(int argc, char** argv) {
  cli::CommandLine cl(
      "sweep", "ptk sweep --recipe FILE [--parallel N] [--threads N] [--dry-run] [--report] [key.path=value ...]",
      "Runs one stage recipe once per point of a grid (cartesian product) and/or a list of overrides, each in\n"
      "<run.dir>/<run name>/ as a child process of this ptk, N at a time with the cores split between them.\n"
      "Then writes <run.dir>/sweep.md and sweep.csv (each run's overrides, final metrics, held-out accuracy)\n"
      "and plots/<metric>.svg (every run's curve overlaid). Rerunning skips finished runs and resumes an\n"
      "interrupted one. Recipe format: pipeline/sweep.h; examples: recipes/ablations/.\n"
      "--threads is per run (default: cores / parallel).");
  cl.flags().add_options()("parallel", po::value<int>()->default_value(0), "runs at a time; 0 = the recipe's `parallel`")(
      "dry-run", "list the runs and their state (new, resume, done) and check each run's recipe with "
      "`ptk <command> --check`; train nothing")(
      "report", "only rewrite the table and plots from the runs' folders");
  cl.accept_recipe({});
  if (!cl.parse(argc, argv)) return 0;
  pipeline::SweepOptions o;
  o.ptk = proc::self_exe();
  o.threads = cl.threads();
  o.parallel = cl.get<int>("parallel");
  o.dry_run = cl.vm().count("dry-run") > 0;
  o.report_only = cl.vm().count("report") > 0;
  if (o.parallel < 0) throw UsageError("ptk sweep: --parallel must be >= 0");
  return pipeline::run_sweep(cl.recipe(), cl.overrides(), o);
}

}  // namespace ptk::app
