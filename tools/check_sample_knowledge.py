#!/usr/bin/env python3
"""Sanity checks for the sample knowledge base in knowledge/.

Counts files per format, reports word counts, and checks the two FAQ files:
every line parses, every "source" exists, and the answer is grounded in its source
(a 3-word span of the answer occurs in the source text, and every number in the answer occurs there too).

    /tmp/kbvenv/bin/python tools/check_sample_knowledge.py      # needs pypdf and python-docx
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _TextHTML(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tags: Counter[str] = Counter()
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def extract_text(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        from pypdf import PdfReader

        return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)
    if suffix == ".docx":
        import docx

        d = docx.Document(str(path))
        parts = [p.text for p in d.paragraphs]
        parts += [c.text for t in d.tables for row in t.rows for c in row.cells]
        return "\n".join(parts)
    raw = path.read_text(encoding="utf-8")
    if suffix in (".html", ".htm"):
        parser = _TextHTML()
        parser.feed(raw)
        return " ".join(parser.parts)
    return raw


def norm(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[^a-z0-9.%']+", " ", text)
    text = re.sub(r"(?<![0-9])\.|\.(?![0-9])", " ", text)  # keep decimal points only
    return " " + re.sub(r"\s+", " ", text).strip() + " "


NUM = re.compile(r"\d[\d,]*(?:\.\d+)?")


def numbers(text: str) -> set[str]:
    return {n.replace(",", "").rstrip(".") for n in NUM.findall(text)}


def grounded(answer: str, source_text: str) -> tuple[bool, bool, set[str]]:
    a, s = norm(answer).split(), norm(source_text)
    span = any(" " + " ".join(a[i:i + 3]) + " " in s for i in range(len(a) - 2))
    missing = numbers(answer) - numbers(source_text)
    return span, not missing, missing


def check_faq(knowledge: Path, rows: list[dict], label: str, texts: dict[str, str]) -> int:
    bad = 0
    span_ok = num_ok = both_ok = 0
    for i, row in enumerate(rows, 1):
        src = row.get("source", "")
        if not (knowledge / src).is_file():
            print(f"  {label} #{i}: source does not exist: {src!r}")
            bad += 1
            continue
        if src not in texts:
            texts[src] = extract_text(knowledge / src)
        span, nums, missing = grounded(row["answer"], texts[src])
        span_ok += span
        num_ok += nums
        both_ok += span and nums
        if not (span and nums):
            print(f"  {label} #{i}: weakly grounded (span={span}, missing numbers={sorted(missing)}): "
                  f"{row['question']}")
    n = len(rows)
    print(f"{label}: {n} entries, sources exist for {n - bad}; 3-word span found {span_ok}/{n}; "
          f"all numbers found {num_ok}/{n}; both {both_ok}/{n}")
    return both_ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--knowledge", type=Path, default=ROOT / "knowledge")
    args = ap.parse_args()
    kb = args.knowledge
    files = sorted(p for p in kb.rglob("*") if p.is_file())
    texts: dict[str, str] = {}
    print("Files and word counts:")
    for p in files:
        rel = p.relative_to(kb).as_posix()
        texts[rel] = extract_text(p)
        print(f"  {rel:58s} {len(texts[rel].split()):6d} words  {p.stat().st_size:7d} bytes")
    fmt = Counter(".qa.jsonl" if p.name.endswith(".qa.jsonl") else p.suffix for p in files)
    print("Files per format:", dict(sorted(fmt.items())), "total", len(files))

    problems = 0
    for p in files:
        if p.suffix == ".html":
            parser = _TextHTML()
            parser.feed(p.read_text(encoding="utf-8"))
            need = ["title", "h1", "h2", "p", "ul"]
            missing = [t for t in need if not parser.tags[t]]
            if missing:
                problems += 1
                print(f"  {p.name}: missing tags {missing}")
            print(f"  {p.name}: tags ok, table={parser.tags['table'] > 0}, "
                  f"script={parser.tags['script']}, style={parser.tags['style']}")
    pdfs = [p for p in files if p.suffix == ".pdf"]
    for p in pdfs:
        from pypdf import PdfReader

        pages = PdfReader(str(p)).pages
        counts = [len((pg.extract_text() or "").split()) for pg in pages]
        print(f"  {p.name}: {len(pages)} pages, words per page {counts}")
        problems += len(pages) < 3 or min(counts) < 50
    for p in (f for f in files if f.suffix == ".docx"):
        import docx

        d = docx.Document(str(p))
        styles = Counter(par.style.name for par in d.paragraphs)
        print(f"  {p.name}: Heading 1={styles['Heading 1']}, Heading 2={styles['Heading 2']}, tables={len(d.tables)}")
        problems += not (styles["Heading 1"] and styles["Heading 2"] and d.tables)

    with open(kb / "cooperative" / "input_prices_2026.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        prices = list(reader)
        print(f"  input_prices_2026.csv: header={reader.fieldnames}, rows={len(prices)}")
        problems += reader.fieldnames != ["item", "unit", "price_kes", "supplier", "notes"]

    jsonl_rows = []
    for n, line in enumerate((kb / "faq" / "member_faq.qa.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            print(f"  jsonl line {n} does not parse: {exc}")
            problems += 1
            continue
        if set(obj) != {"question", "answer", "source"}:
            print(f"  jsonl line {n}: unexpected keys {sorted(obj)}")
            problems += 1
        jsonl_rows.append(obj)
    with open(kb / "faq" / "extension_questions.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        csv_rows = list(reader)
        problems += reader.fieldnames != ["question", "answer", "source"]

    good = check_faq(kb, jsonl_rows, "member_faq.qa.jsonl", texts)
    check_faq(kb, csv_rows, "extension_questions.csv", texts)
    covered = {r["source"] for r in jsonl_rows}
    docs = {p.relative_to(kb).as_posix() for p in files if p.parent.name != "faq"}
    print(f"documents with at least one FAQ entry: {len(covered & docs)}/{len(docs)}",
          "uncovered:", sorted(docs - covered))
    dup = [q for q, c in Counter(r["question"] for r in jsonl_rows + csv_rows).items() if c > 1]
    print("duplicate questions:", dup)
    problems += len(jsonl_rows) < 70 or good < 60 or bool(dup)
    print("RESULT:", "OK" if not problems else f"{problems} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
