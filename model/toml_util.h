// Parsing TOML text into a table, with a syntax error turned into one ConfigError line
// "SOURCE:LINE:COLUMN: what" (configs and experiment specs share this).
#pragma once

#include <toml++/toml.h>

#include <sstream>
#include <string>

#include "model/error.h"

namespace loopmoe::model {

inline toml::table parse_toml(const std::string& text, const std::string& source) {
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << source << ":" << e.source().begin.line << ":" << e.source().begin.column << ": "
       << e.description();
    throw ConfigError(os.str());
  }
}

}  // namespace loopmoe::model
