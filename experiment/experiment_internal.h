// Private to experiment/: what the experiment's files share (experiment_plan.cc defines these;
// experiment_runner.cc prints the plan before running it).
#pragma once

#include <cstdio>
#include <string>

#include "experiment/experiment.h"

namespace loopmoe::experiment::internal {

// "2x4 E8 k2 f64 inner64 joint dc16": the plan's and sweep.json's short description of a model.
std::string describe_model(const model::ModelConfig& m);

// Prints the plan: variants with their analytic figures, the sweep, the grid, the total; with
// `measure`, also measured step times and the estimated wall time (the dry run).
void print_plan(const ExperimentPlan& plan, const ExperimentHooks& hooks, bool measure,
                std::FILE* out);

}  // namespace loopmoe::experiment::internal
