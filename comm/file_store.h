// A KeyValueStore in a shared directory, one file per key, so that separate processes on one
// machine (or on a shared file system) can rendezvous without a coordinator. Tests and local runs
// only: it polls, and it never deletes anything (use a fresh directory per run, or namespaces).
#pragma once

#include <filesystem>

#include "comm/key_value_store.h"

namespace loopmoe::comm {

class FileStore final : public KeyValueStore {
 public:
  // Creates `directory` if it does not exist.
  explicit FileStore(std::filesystem::path directory);

  const std::filesystem::path& directory() const { return directory_; }

  // Writes a temporary file and renames it over the key's file, so a reader sees either no value
  // or the whole value, never a partial one.
  void set(const std::string& key, const std::string& value) override;
  std::optional<std::string> get(const std::string& key) override;
  // Polls (1 ms growing to 20 ms between looks).
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override;

 private:
  std::filesystem::path path_for(const std::string& key) const;

  std::filesystem::path directory_;
};

}  // namespace loopmoe::comm
