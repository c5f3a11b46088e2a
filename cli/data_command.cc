#include "cli/data_command.h"

#include <CLI/CLI.hpp>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "dataloader/prepare.h"
#include "dataloader/token_shard.h"

namespace loopmoe::cli {
namespace {

void register_prepare(CLI::App& data) {
  auto options = std::make_shared<dataloader::PrepareOptions>();
  CLI::App* cmd = data.add_subcommand(
      "prepare",
      "Tokenize text files into DIR/{tokenizer.model,train.bin,val.bin,meta.json} "
      "(format: docs/DATA.md)");
  cmd->add_option("--input", options->inputs,
                  "Text files, or directories whose *.txt files are taken; one document per file. "
                  "Each directory is a domain: the split is stratified by domain and meta.json "
                  "counts tokens per domain")
      ->required()
      ->check(CLI::ExistingPath);
  cmd->add_option("--out", options->out_dir, "Output directory (created if missing)")->required();
  cmd->add_option("--vocab", options->vocab_size,
                  "Vocabulary size of the BPE tokenizer to train (required unless --tokenizer)");
  cmd->add_option("--tokenizer", options->tokenizer_model,
                  "Use this sentencepiece model instead of training one")
      ->check(CLI::ExistingFile);
  cmd->add_option("--val-fraction", options->val_fraction,
                  "Share of documents held out for validation (long documents are cut into "
                  "chunks when there are too few; docs/DATA.md)")
      ->capture_default_str();
  cmd->add_option("--seed", options->seed, "Seed of the train/validation split")
      ->capture_default_str();
  cmd->add_flag("--docs-per-line", options->docs_per_line,
                "Treat each non-blank line as a document (default: each file is one)");
  cmd->add_option("--threads", options->threads,
                  "Encoding threads (0: every core; tokenizer training stays on one, so the model "
                  "is reproducible); the output does not depend on it")
      ->capture_default_str();
  cmd->callback([options] {
    if (options->tokenizer_model.empty() && options->vocab_size == 0) {
      throw CLI::ValidationError("--vocab N is required unless --tokenizer MODEL is given");
    }
    options->log = &std::cout;
    const dataloader::PrepareResult r = dataloader::prepare_dataset(*options);
    std::cout << "data prepare: done: vocab " << r.vocab_size << ", train " << r.train_docs
              << " docs / " << r.train_tokens << " tokens, val " << r.val_docs << " docs / "
              << r.val_tokens << " tokens";
    if (r.chunked_docs > 0) {
      std::cout << "; " << r.chunked_docs << (r.chunked_docs == 1 ? " document" : " documents")
                << " cut into " << r.chunks << " chunks for the split (" << r.val_chunks
                << " to val; docs/DATA.md)";
    }
    std::cout << " (tokenizer " << r.tokenizer_seconds << " s, encode " << r.encode_seconds << " s)"
              << std::endl;
  });
}

void register_info(CLI::App& data) {
  auto files = std::make_shared<std::vector<std::string>>();
  CLI::App* cmd = data.add_subcommand("info", "Validate token shards and print their headers");
  cmd->add_option("shards", *files, "Token shard files (.bin)")->required();
  cmd->callback([files] {
    for (const std::string& f : *files) {
      const dataloader::TokenShard shard = dataloader::TokenShard::open(f);
      std::cout << f << ": ok, vocab " << shard.vocab_size() << ", " << shard.num_docs()
                << " docs, " << shard.num_tokens() << " tokens, " << shard.bytes_per_token()
                << " bytes/token, xxh64 " << std::hex << shard.checksum() << std::dec << std::endl;
    }
  });
}

}  // namespace

void register_data_command(CLI::App& app) {
  CLI::App* data = app.add_subcommand("data", "Prepare and inspect token datasets");
  data->require_subcommand(1);
  register_prepare(*data);
  register_info(*data);
}

}  // namespace loopmoe::cli
