// DataError for common/'s atomic writes (file_util.h).
#include "dataloader/file_util.h"

#include "dataloader/data_error.h"

namespace loopmoe::dataloader {

void throw_data_error(const common::WriteFailure& failure) { throw DataError(failure.message()); }

}  // namespace loopmoe::dataloader
