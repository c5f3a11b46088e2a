// Where a job may write (docs/SERVICE.md "Security"): a job's output_dir must lie under the
// coordinator's data root, so that a CLI user cannot have the training processes write
// checkpoints anywhere the processes can.
#pragma once

#include <string>

namespace loopmoe::coordinator {

// `output_dir` (a relative one is taken relative to `data_root`) resolved: made absolute, `.` and
// `..` removed and every symlink of the part that exists followed (std::filesystem::
// weakly_canonical). Returns it when it is `data_root` (resolved the same way) or under it; throws
// std::invalid_argument with one message naming both otherwise.
std::string confine_output_dir(const std::string& output_dir, const std::string& data_root);

}  // namespace loopmoe::coordinator
