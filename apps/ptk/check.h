// `--check` for the training commands: what is validated beyond binding the recipe (the model.config
// a random-init run would read; a config.json, no weights), then the closing line. Not the binding
// itself (config::bind_recipe, with the stage's cross-checks, runs before this in each command).
#pragma once
#include "apps/ptk/cli.h"
#include "core/checkpoint/hf_config.h"
#include "core/config/sections.h"

namespace ptk::app {

// Reads model.config when the run would use it (no model.path): shapes and architecture are
// checked there (checkpoint::parse_config). Throws ptk::Error; returns the command's exit status.
inline int finish_check(const cli::CommandLine& cl, const config::ModelSection& model) {
  if (model.path.empty() && !model.config.empty()) checkpoint::read_config(model.config);
  cl.report_valid();
  return 0;
}

}  // namespace ptk::app
