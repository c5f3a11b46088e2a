#!/usr/bin/env python3
"""Tests of scripts/corpus_extract.py on the tiny fixtures in fixtures/ (no network).

Run: /usr/bin/python3 tests/corpus/test_corpus_extract.py   (exits non-zero on failure)
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
EXTRACT = HERE.parent.parent / "scripts" / "corpus_extract.py"
LEAKS = ["SCRIPT_LEAK", "STYLE-LEAK", "NAV-LEAK", "RELATED-LEAK", "FOOTER-LEAK", "CODE_LEAK",
         "Ignored title", "¶", "<p>", "&amp;", "TOCTREE-LEAK", "LITERAL-BLOCK-LEAK",
         "DIRECTIVE-LEAK", "SPDX", ":maxdepth:", ":ref:", "``", "**", "====", "B<"]


def run_extract(dest, source, fmt, folder, include):
    subprocess.run([sys.executable, str(EXTRACT), "extract", "--source", source,
                    "--package", "pkg-" + source, "--version", "1.0", "--license", "Test-1.0",
                    "--format", fmt, "--root", str(FIXTURES / folder), "--include", include,
                    "--path-prefix", f"/fixtures/{folder}/", "--out", str(dest / source)],
                   check=True, capture_output=True)


def build_corpus(dest):
    """Four sources in sorted order; b-html repeats a-html to exercise cross-source dedup."""
    run_extract(dest, "a-html", "html", "html", "*.html")
    run_extract(dest, "b-html", "html", "html", "page.html")
    run_extract(dest, "c-rst", "rst", "rst", "*.rst")
    run_extract(dest, "d-pod", "pod", "pod", "*.pod")
    subprocess.run([sys.executable, str(EXTRACT), "manifest", "--dest", str(dest)], check=True,
                   capture_output=True)
    return json.loads((dest / "manifest.json").read_text(encoding="utf-8"))


def tree(dest):
    """{relative path: bytes} of every file under dest."""
    return {p.relative_to(dest).as_posix(): p.read_bytes()
            for p in sorted(dest.rglob("*")) if p.is_file()}


class CorpusExtractTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="corpus_test_"))
        cls.dest = cls.tmp / "one"
        cls.manifest = build_corpus(cls.dest)
        cls.docs = {d["file"]: d for d in cls.manifest["documents"]}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def text(self, name):
        return (self.dest / name).read_text(encoding="utf-8")

    def test_expected_documents(self):
        self.assertEqual(sorted(self.docs), ["a-html/a-html-page.txt", "c-rst/c-rst-guide.txt",
                                             "d-pod/d-pod-tool.txt"])

    def test_html_prose_kept_and_markup_removed(self):
        text = self.text("a-html/a-html-page.txt")
        self.assertIn("Caching Strategies", text)
        self.assertIn("A cache keeps recently used data close to the processor, so that "
                      "repeated reads are cheap & fast.", text)
        self.assertIn("Write-back caches defer it.", text)
        self.assertIn("\n\n", text, "paragraph breaks are kept")
        for leak in LEAKS:
            self.assertNotIn(leak, text)

    def test_rst_prose_kept_and_markup_removed(self):
        text = self.text("c-rst/c-rst-guide.txt")
        self.assertIn("Writing Guides", text)
        self.assertIn("with clear words and literal names", text)
        self.assertIn("refers to the style rules and the website.", text)
        self.assertIn("Notes keep their body text", text)
        self.assertIn("guides should stay short", text)
        for leak in LEAKS:
            self.assertNotIn(leak, text)

    def test_pod_rendered(self):
        text = self.text("d-pod/d-pod-tool.txt")
        self.assertIn("tool reads its input and writes a summary", text)
        self.assertIn("NAME", text)
        self.assertNotIn("=head1", text)
        self.assertNotIn("B<", text)

    def test_duplicates_dropped(self):
        src = self.manifest["sources"]
        self.assertEqual(src["a-html"]["dropped"]["duplicate"], 1)      # page2.html
        self.assertEqual(src["b-html"]["dropped"]["duplicate_of_earlier_source"], 1)
        self.assertEqual(src["b-html"]["docs"], 0)
        self.assertEqual(list((self.dest / "b-html").glob("*.txt")), [])
        self.assertFalse((self.dest / "a-html" / "a-html-page2.txt").exists())

    def test_tiny_documents_dropped(self):
        self.assertEqual(self.manifest["sources"]["a-html"]["dropped"]["small"], 1)
        self.assertFalse((self.dest / "a-html" / "a-html-tiny.txt").exists())

    def test_manifest_fields_and_totals(self):
        for name, doc in self.docs.items():
            data = (self.dest / name).read_bytes()
            self.assertEqual(doc["bytes"], len(data))
            self.assertEqual(doc["words"], len(data.decode("utf-8").split()))
            self.assertEqual(doc["sha256"], hashlib.sha256(data).hexdigest())
            self.assertEqual(doc["package"], "pkg-" + doc["source"])
            self.assertEqual(doc["version"], "1.0")
            self.assertEqual(doc["license"], "Test-1.0")
            self.assertTrue(doc["path"].startswith("/fixtures/"))
        self.assertEqual(self.docs["a-html/a-html-page.txt"]["path"], "/fixtures/html/page.html")
        docs = self.manifest["documents"]
        total = self.manifest["totals"]
        self.assertEqual(total["docs"], len(docs))
        self.assertEqual(total["bytes"], sum(d["bytes"] for d in docs))
        self.assertEqual(total["words"], sum(d["words"] for d in docs))
        self.assertEqual(total["est_tokens"], round(total["words"] * 1.3))
        for name, src in self.manifest["sources"].items():
            mine = [d for d in docs if d["source"] == name]
            self.assertEqual(src["docs"], len(mine))
            self.assertEqual(src["words"], sum(d["words"] for d in mine))
            self.assertEqual(src["bytes"], sum(d["bytes"] for d in mine))

    def test_outputs_are_utf8_and_not_blank(self):
        for path in self.dest.rglob("*.txt"):
            text = path.read_bytes().decode("utf-8")  # raises if not UTF-8
            self.assertTrue(text.strip())
            self.assertTrue(text.endswith("\n") and not text.endswith("\n\n"))
            self.assertGreaterEqual(len(text.encode("utf-8")), 200)

    def test_deterministic(self):
        again = self.tmp / "two"
        build_corpus(again)
        self.assertEqual(tree(self.dest), tree(again))

    def test_non_utf8_input_dropped(self):
        bad = self.tmp / "bad"
        bad.mkdir()
        (bad / "latin1.txt").write_bytes(("caf\xe9 " * 100).encode("latin-1"))
        out = self.tmp / "bad-out"
        subprocess.run([sys.executable, str(EXTRACT), "extract", "--source", "bad", "--package",
                        "p", "--version", "1", "--license", "l", "--format", "text", "--root",
                        str(bad), "--include", "*.txt", "--out", str(out / "bad")], check=True,
                       capture_output=True)
        record = json.loads((out / "bad" / "source.json").read_text(encoding="utf-8"))
        self.assertEqual(record["dropped"]["not_utf8"], 1)
        self.assertEqual(record["documents"], [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
