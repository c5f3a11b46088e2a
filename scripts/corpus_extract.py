#!/usr/bin/env python3
"""Turns unpacked documentation packages into plain-text training documents.

Two commands, both driven by scripts/fetch_corpus.sh (standard library only, so it runs on a bare
Debian with nothing but python3):

  extract   one source: read the files of an unpacked package that match --include, pull the
            readable prose out of each (HTML, reStructuredText, POD, plain text, GCIDE, WordNet),
            drop tiny, non-UTF-8 and duplicate documents, and write OUT/<name>.txt plus
            OUT/source.json (the per-source record, written last).
  manifest  all sources under DEST: drop documents that repeat one of an earlier source (sources
            and files in sorted order; the first wins), then write DEST/manifest.json.

Everything is deterministic: inputs are walked in sorted order, nothing depends on time, locale or
the machine, so the same packages give byte-identical files and manifest.
"""

import argparse
import fnmatch
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

MIN_BYTES = 200          # smaller documents are mostly navigation stubs and index pages
TOKENS_PER_WORD = 1.3    # rough English BPE ratio, until a real tokenizer counts them
SOURCE_RECORD = "source.json"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Text helpers


# C0/C1 control characters other than tab and newline: they carry no text and some tokenizers
# (and editors) choke on them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def tidy(text):
    """Common final cleanup: controls out, trailing blanks off, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    out, blank = [], True  # blank=True also drops leading blank lines
    for line in lines:
        if not line.strip():
            if not blank:
                out.append("")
            blank = True
            continue
        out.append(line)
        blank = False
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n" if out else ""


def dedent(text):
    """Removes the indentation common to all non-blank lines (pod2text indents everything)."""
    lines = text.split("\n")
    widths = [len(l) - len(l.lstrip(" ")) for l in lines if l.strip()]
    cut = min(widths) if widths else 0
    return "\n".join(l[cut:] for l in lines)


def normalized_key(text):
    """Dedup key: NFKC, case-folded, whitespace-collapsed text, so reflowed copies still match."""
    norm = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def count_words(text):
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# HTML


# Elements whose whole content is never prose.
_SKIP_TAGS = {"script", "style", "nav", "header", "footer", "head", "noscript", "svg", "form",
              "button", "select", "template", "iframe", "object", "math", "map"}
# Sphinx (classic, python-docs and read-the-docs themes) and DocBook navigation chrome.
_SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "headerlink", "navheader", "navfooter",
                 "toc", "wy-nav-side", "wy-nav-top", "rst-versions", "rst-footer-buttons",
                 "wy-breadcrumbs", "mobile-nav", "toctree-wrapper", "breadcrumbs", "nav-content",
                 "sphinxsidebarwrapper", "searchbox", "genindex-jumpbox",
                 "summary"}  # javadoc's member summaries repeat its details
_SKIP_ROLES = {"navigation", "search", "contentinfo", "banner"}
# Code: <pre> and Sphinx's highlight wrappers (a <div class="highlight-*"> holds a <pre>).
_CODE_TAGS = {"pre"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
         "source", "track", "wbr"}
# Elements that end a paragraph (a line break in the output); the rest is inline.
_BLOCK = {"p", "div", "section", "article", "main", "aside", "h1", "h2", "h3", "h4", "h5", "h6",
          "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "td", "th", "thead", "tbody",
          "blockquote", "pre", "br", "hr", "figure", "figcaption", "caption", "body", "title",
          "details", "summary", "address"}


class _ProseParser(html.parser.HTMLParser):
    """Collects the text outside skipped elements; each block element starts a new paragraph."""

    def __init__(self, keep_pre):
        super().__init__(convert_charrefs=True)
        self.keep_pre = keep_pre
        self.stack = []      # (tag, skips) for each open non-void element
        self.skipping = 0    # how many open elements on the stack skip their content
        self.paragraphs = []
        self.current = []
        self.in_pre = 0

    def _skips(self, tag, attrs):
        if tag in _SKIP_TAGS or (tag in _CODE_TAGS and not self.keep_pre):
            return True
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if classes & _SKIP_CLASSES or attrs.get("role") in _SKIP_ROLES:
            return True
        return not self.keep_pre and any(c.startswith("highlight") for c in classes)

    def _break(self):
        text = "".join(self.current)
        if not self.in_pre:
            text = " ".join(text.split())
        if text.strip():
            self.paragraphs.append(text.strip("\n"))
        self.current = []

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK:
            self._break()
        if tag in _VOID:
            return
        skips = self._skips(tag, attrs)
        self.stack.append((tag, skips))
        self.skipping += skips
        if tag == "pre":
            self.in_pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK:
            self._break()

    def handle_endtag(self, tag):
        # Pop back to the matching open element; unclosed <p>/<li> inside it close with it.
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skips = self.stack.pop()
            self.skipping -= skips
            if t == "pre":
                self.in_pre -= 1
            if t == tag:
                break
        if tag in _BLOCK:
            self._break()

    def handle_data(self, data):
        if not self.skipping:
            self.current.append(data)

    def text(self):
        self._break()
        return "\n\n".join(self.paragraphs)


def html_to_text(source, keep_pre=False):
    parser = _ProseParser(keep_pre)
    parser.feed(source)
    parser.close()
    return parser.text()


# ---------------------------------------------------------------------------------------------
# reStructuredText


# Directives whose indented body is code, tables of contents or machinery, never prose.
_RST_DROP_BODY = {"code-block", "code", "sourcecode", "literalinclude", "include", "toctree",
                  "kernel-doc", "highlight", "image", "figure", "raw", "index", "only", "c:macro",
                  "c:function", "c:type", "c:struct", "flat-table", "list-table", "csv-table",
                  "productionlist", "graphviz", "kernel-figure", "kernel-render", "kernel-include",
                  "kernel-abi", "kernel-feat", "doctest", "testcode", "testoutput", "math",
                  "parsed-literal", "literal", "table", "cssclass", "tabularcolumns",
                  "automodule", "autoclass", "autofunction", "ifconfig"}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_RST_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+_:.<>])\1{2,}\s*$")
_RST_TABLE_RULE = re.compile(r"^\s*[+|][-=+|: ]+[+|]\s*$|^\s*=+( +=+)+\s*$")
_RST_FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")
# Inline markup, applied in order.
_RST_INLINE = [
    (re.compile(r":[\w:.+-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`Title <target>` -> Title
    (re.compile(r":[\w:.+-]+:`~?([^`]*)`"), r"\1"),             # :func:`name` -> name
    (re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?"), r"\1"),          # `text <url>`_ -> text
    (re.compile(r"``([^`]+)``"), r"\1"),                        # ``literal`` -> literal
    (re.compile(r"`([^`]+)`__?"), r"\1"),                       # `ref`_ -> ref
    (re.compile(r"`([^`]+)`"), r"\1"),                          # `interpreted` -> interpreted
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),                    # **strong**
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),  # *emphasis*
    (re.compile(r"\|([\w -]+)\|_?"), r"\1"),                    # |substitution|
    (re.compile(r"\[(#?\w*|\*)\]_"), ""),                       # footnote references
    (re.compile(r"\b(\w+)__?(?=[\s.,;:)]|$)"), r"\1"),          # word_ references
]


def _indent(line):
    return len(line) - len(line.lstrip(" \t"))


def _skip_block(lines, i, base):
    """Index of the first line after the block indented deeper than `base` that starts at i."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def rst_to_text(source):
    lines = source.expandtabs(8).split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            base, name = len(directive.group(1)), directive.group(2).lower()
            if name in _RST_DROP_BODY or name.startswith(("c:", "py:", "cpp:", "rst:")):
                i = _skip_block(lines, i + 1, base)
                continue
            # Prose directives (note, warning, ...): keep their argument and body, not options.
            if directive.group(3).strip():
                out.append(directive.group(3).strip())
            i += 1
            while i < len(lines) and _RST_FIELD.match(lines[i]):
                i += 1
            continue
        if _RST_COMMENT.match(line):                 # comments, targets, substitutions
            i = _skip_block(lines, i + 1, _indent(line))
            continue
        if _RST_ADORNMENT.match(line) or _RST_TABLE_RULE.match(line):
            i += 1
            continue
        if line.rstrip().endswith("::"):            # paragraph introducing a literal block
            text = line.rstrip()[:-2].rstrip()
            out.append(text + ":" if text.strip() and not text.endswith(":") else text)
            i = _skip_block(lines, i + 1, _indent(line))
            continue
        out.append(line)
        i += 1
    text = dedent("\n".join(out))
    for pattern, repl in _RST_INLINE:
        text = pattern.sub(repl, text)
    return "\n".join(l.strip() if l.strip() else "" for l in text.split("\n"))


# ---------------------------------------------------------------------------------------------
# POD, plain text, dictionaries


def pod_to_text(path):
    """POD through pod2text (perl's own renderer, in perl on Debian), UTF-8 in and out."""
    proc = subprocess.run(["pod2text", "--utf8", "--loose", str(path)], capture_output=True,
                          env={**os.environ, "LC_ALL": "C.UTF-8"}, check=False)
    if proc.returncode != 0:
        raise ValueError("pod2text failed: " + proc.stderr.decode("utf-8", "replace").strip())
    return dedent(proc.stdout.decode("utf-8"))


def plain_to_text(source):
    return source




_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape kept from bad UTF-8


def gcide_to_texts(source):
    """dict-gcide's gcide.dict, split into one document per initial letter (dictd entries)."""
    docs = {}
    for block in source.split("\n\n"):
        block = dedent(block.strip("\n"))
        if not block.strip() or block.startswith("00-database") or _SURROGATE.search(block):
            continue
        key = unicodedata.normalize("NFKD", block.lstrip()[:1]).casefold()[:1]
        key = key if key.isalpha() and key.isascii() else "other"
        docs.setdefault(key, []).append(block)
    return {k: "\n\n".join(v) for k, v in docs.items()}


def wordnet_to_texts(source):
    """WordNet data.* files: one paragraph per synset: 'word, word: gloss'."""
    entries = []
    for line in source.split("\n"):
        if not line or line.startswith("  "):      # licence header lines start with two spaces
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        if len(fields) < 4 or not gloss.strip():
            continue
        count = int(fields[3], 16)
        words = [w.replace("_", " ") for w in fields[4:4 + 2 * count:2]]
        words = [re.sub(r"\(\w+\)$", "", w) for w in words]
        entries.append(", ".join(words) + ": " + gloss.strip())
    return {"": "\n\n".join(entries)}


# ---------------------------------------------------------------------------------------------
# Source extraction


def read_bytes(path):
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith((".gz", ".dz")) else data  # .dz: dictzip


def base_name(rel):
    """Relative path without the format suffixes (.gz, .html, .rst.txt, ...)."""
    name = rel
    for suffix in (".gz", ".dz", ".txt", ".html", ".htm", ".rst", ".pod", ".dict"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def doc_file_name(source, rel, suffix=""):
    """Stable, readable file name: source, then the sanitized relative path (sha-capped)."""
    stem = base_name(rel) + suffix
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "--")).strip("._-")
    if len(stem) > 120:
        stem = stem[:100] + "-" + hashlib.sha256(rel.encode()).hexdigest()[:12]
    return f"{source}-{stem}.txt"


def find_inputs(root, includes, excludes):
    """Sorted relative paths under root that match an include and no exclude pattern.

    Patterns are fnmatch patterns on the whole relative path, where '*' also crosses '/'."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not any(fnmatch.fnmatchcase(rel, p) for p in includes):
                continue
            if not any(fnmatch.fnmatchcase(rel, p) for p in excludes):
                found.append(rel)
    return sorted(found)


def convert(fmt, root, rel, keep_pre):
    """Returns {name_suffix: text} for one input file (dictionaries give several documents)."""
    path = root / rel
    if fmt == "pod":
        return {"": pod_to_text(path)}
    if fmt == "gcide":  # a few entries hold stray CP1252 bytes: drop those entries, not all
        raw = read_bytes(path).decode("utf-8", "surrogateescape")
        return {"-" + k: v for k, v in gcide_to_texts(raw).items()}
    raw = read_bytes(path).decode("utf-8")          # UnicodeDecodeError: not UTF-8, dropped
    if fmt == "html":
        return {"": html_to_text(raw, keep_pre)}
    if fmt == "rst":
        return {"": rst_to_text(raw)}
    if fmt == "text":
        return {"": plain_to_text(raw)}
    if fmt == "wordnet":
        return wordnet_to_texts(raw)
    raise ValueError(f"unknown format {fmt}")


def extract(args):
    root, out = Path(args.root), Path(args.out)
    inputs = find_inputs(root, args.include, args.exclude or [])
    if not inputs:
        sys.exit(f"corpus_extract: error: {root}: no file matches {' '.join(args.include)}")
    out.mkdir(parents=True, exist_ok=True)
    docs, seen = [], set()
    dropped = {"small": 0, "not_utf8": 0, "failed": 0, "duplicate": 0}
    for rel in inputs:
        try:
            pieces = convert(args.format, root, rel, args.keep_pre)
        except (UnicodeDecodeError, ValueError) as err:
            dropped["not_utf8" if isinstance(err, UnicodeDecodeError) else "failed"] += 1
            continue
        for suffix, text in sorted(pieces.items()):
            text = tidy(text)
            data = text.encode("utf-8", "strict")
            if len(data) < args.min_bytes or not text.strip():
                dropped["small"] += 1
                continue
            key = normalized_key(text)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            name = doc_file_name(args.source, rel, suffix)
            (out / name).write_bytes(data)
            docs.append({"file": name, "path": args.path_prefix + rel, "bytes": len(data),
                         "words": count_words(text), "sha256": hashlib.sha256(data).hexdigest(),
                         "key": key})
    names = [d["file"] for d in docs]
    if len(set(names)) != len(names):
        sys.exit(f"corpus_extract: error: {args.source}: two inputs map to one file name")
    record = {"source": args.source, "package": args.package, "version": args.version,
              "license": args.license, "format": args.format, "inputs": len(inputs),
              "dropped": dropped, "documents": sorted(docs, key=lambda d: d["file"])}
    write_json(out / SOURCE_RECORD, record)
    print(f"corpus_extract: {args.source}: {len(docs)} documents from {len(inputs)} files "
          f"(dropped {dropped['small']} small, {dropped['not_utf8']} not UTF-8, "
          f"{dropped['failed']} failed, {dropped['duplicate']} duplicate)")


# ---------------------------------------------------------------------------------------------
# Manifest


def write_json(path, value):
    """Atomic: a reader sees the old file or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def totals(docs):
    words = sum(d["words"] for d in docs)
    return {"docs": len(docs), "bytes": sum(d["bytes"] for d in docs), "words": words,
            "est_tokens": round(words * TOKENS_PER_WORD)}


def manifest(args):
    dest = Path(args.dest)
    records = sorted((json.loads(p.read_text(encoding="utf-8"))
                      for p in dest.glob("*/" + SOURCE_RECORD)), key=lambda r: r["source"])
    if not records:
        sys.exit(f"corpus_extract: error: {dest}: no source has been extracted")
    seen, documents, sources = set(), [], {}
    for rec in records:
        kept = []
        cross = 0
        for doc in rec["documents"]:
            if doc["key"] in seen:   # an earlier source has the same text: the earlier one wins
                (dest / rec["source"] / doc["file"]).unlink(missing_ok=True)
                cross += 1
                continue
            seen.add(doc["key"])
            kept.append(doc)
            documents.append({"file": f"{rec['source']}/{doc['file']}", "source": rec["source"],
                              "package": rec["package"], "version": rec["version"],
                              "license": rec["license"], "path": doc["path"],
                              "bytes": doc["bytes"], "words": doc["words"],
                              "sha256": doc["sha256"]})
        dropped = dict(rec["dropped"], duplicate_of_earlier_source=cross)
        sources[rec["source"]] = dict(totals(kept), package=rec["package"],
                                      version=rec["version"], license=rec["license"],
                                      format=rec["format"], inputs=rec["inputs"], dropped=dropped)
    write_json(dest / MANIFEST, {"tokens_per_word": TOKENS_PER_WORD,
                                 "min_bytes": args.min_bytes, "totals": totals(documents),
                                 "sources": sources, "documents": documents})
    t = totals(documents)
    print(f"corpus_extract: manifest: {t['docs']} documents, {t['bytes']} bytes, {t['words']} "
          f"words, ~{t['est_tokens']} tokens (1.3 per word) in {len(sources)} sources")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="extract one source")
    ex.add_argument("--source", required=True, help="source name (output folder, file prefix)")
    ex.add_argument("--root", required=True, help="unpacked package root")
    ex.add_argument("--include", required=True, action="append",
                    help="fnmatch pattern of relative paths to read ('*' crosses '/')")
    ex.add_argument("--exclude", action="append", help="fnmatch pattern of paths to leave out")
    ex.add_argument("--format", required=True,
                    choices=["html", "rst", "pod", "text", "gcide", "wordnet"])
    ex.add_argument("--out", required=True, help="output folder (the caller renames it)")
    ex.add_argument("--package", required=True)
    ex.add_argument("--version", required=True)
    ex.add_argument("--license", required=True)
    ex.add_argument("--path-prefix", default="/", help="prefix of the recorded original paths")
    ex.add_argument("--keep-pre", action="store_true", help="keep <pre> code blocks (HTML)")
    ex.add_argument("--min-bytes", type=int, default=MIN_BYTES)
    ma = sub.add_parser("manifest", help="cross-source dedup and DEST/manifest.json")
    ma.add_argument("--dest", required=True)
    ma.add_argument("--min-bytes", type=int, default=MIN_BYTES)
    args = parser.parse_args(argv)
    extract(args) if args.command == "extract" else manifest(args)


if __name__ == "__main__":
    main()
