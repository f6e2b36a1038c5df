"""Ingestion: every supported format is read with its structure, and every kind of bad input is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.ingest import run as ingest
from core.config import IngestConfig
from tests.docs_factory import make_blank_pdf, make_docx, make_encrypted_pdf, make_pdf

REPO = Path(__file__).resolve().parent.parent


def _quiet(_msg: str) -> None:
    pass


def _errors(result) -> dict[str, str]:
    return {e["path"]: e["error"] for e in result.errors}


def _docs(result) -> dict:
    return {d.source: d for d in result.documents}


def test_markdown_keeps_heading_path_and_drops_markup(tmp_path):
    (tmp_path / "guide.md").write_text("# Maize Guide\n\nIntro text about maize.\n\n## Planting\n\n"
                                       "### Spacing\n\nUse **75 cm** between rows and [25 cm](x.html) within.\n")
    doc = _docs(ingest(IngestConfig(), tmp_path, log=_quiet))["guide.md"]
    assert doc.title == "Maize Guide"
    spacing = next(b for b in doc.blocks if "75 cm" in b.text)
    assert spacing.headings == ("Maize Guide", "Planting", "Spacing")
    assert spacing.text == "Use 75 cm between rows and 25 cm within."


def test_html_drops_scripts_and_styles_and_keeps_headings_and_tables(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>Dairy Notes</title><style>p {color: red}</style></head><body>"
        "<script>var secret = 'tracking';</script><h1>Dairy</h1><h2>Feeding</h2>"
        "<p>Give each cow 70 litres of water a day.</p>"
        "<table><tr><th>Feed</th><th>kg</th></tr><tr><td>Napier</td><td>40</td></tr></table></body></html>")
    doc = _docs(ingest(IngestConfig(), tmp_path, log=_quiet))["page.html"]
    text = doc.text
    assert doc.title == "Dairy Notes"
    assert "tracking" not in text and "color" not in text
    water = next(b for b in doc.blocks if "70 litres" in b.text)
    assert water.headings == ("Dairy", "Feeding")
    assert any(b.kind == "table" and "Napier | 40" in b.text for b in doc.blocks)


def test_pdf_pages_are_numbered(tmp_path):
    make_pdf(tmp_path / "coffee.pdf", [["Coffee delivery rules.", "Cherry must be red ripe."],
                                       ["Payment is made on the 15th of each month."]])
    doc = _docs(ingest(IngestConfig(), tmp_path, log=_quiet))["coffee.pdf"]
    payment = next(b for b in doc.blocks if "15th" in b.text)
    assert payment.page == 2
    assert payment.location() == "page 2"


def test_docx_headings_paragraphs_and_tables(tmp_path):
    make_docx(tmp_path / "bylaws.docx", "By-laws", [("Membership", ["A member buys at least 10 shares."]),
                                                  ("Meetings", ["The AGM is held every March."])],
              table=[["Fee", "KES"], ["Entrance", "1000"]])
    doc = _docs(ingest(IngestConfig(), tmp_path, log=_quiet))["bylaws.docx"]
    agm = next(b for b in doc.blocks if "AGM" in b.text)
    assert agm.headings == ("By-laws", "Meetings")
    assert any(b.kind == "table" and "Entrance | 1000" in b.text for b in doc.blocks)


def test_csv_table_rows_become_blocks_and_qa_csv_becomes_supervision(tmp_path):
    (tmp_path / "prices.csv").write_text("item,unit,price_kes\nDAP,50 kg bag,3500\nCAN,50 kg bag,3000\n")
    (tmp_path / "faq.csv").write_text("question,answer,source\nWhen is the AGM?,Every March.,bylaws.docx\n")
    result = ingest(IngestConfig(), tmp_path, log=_quiet)
    prices = _docs(result)["prices.csv"]
    assert any("item: DAP; unit: 50 kg bag; price_kes: 3500" == b.text for b in prices.blocks)
    assert [(p.question, p.answer, p.source) for p in result.qa_pairs] == [
        ("When is the AGM?", "Every March.", "bylaws.docx")]


def test_qa_jsonl_pairs_are_indexed_and_kept_and_bad_lines_warned(tmp_path):
    lines = [json.dumps({"question": "How deep to plant beans?", "answer": "About 5 cm.", "source": "beans.md"}),
             "not json", json.dumps({"question": "Missing answer"})]
    (tmp_path / "member.qa.jsonl").write_text("\n".join(lines) + "\n")
    result = ingest(IngestConfig(), tmp_path, log=_quiet)
    assert [p.source for p in result.qa_pairs] == ["beans.md"]
    assert "Q: How deep to plant beans?" in _docs(result)["member.qa.jsonl"].text
    assert result.warnings and "lines 2, 3" in result.warnings[0]["warning"]


def test_non_utf8_text_is_decoded_with_a_warning(tmp_path):
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 au lait et cr\xe8me fra\xeeche pour la r\xe9union."
                                         .encode("latin-1") * 3)
    result = ingest(IngestConfig(), tmp_path, log=_quiet)
    assert "Café au lait" in _docs(result)["latin.txt"].text
    assert result.warnings and "not UTF-8" in result.warnings[0]["warning"]


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """Good files mixed with every kind of bad input the build must survive."""
    root = tmp_path / "kb"
    root.mkdir()
    (root / "good.md").write_text("# Good\n\nSorghum tolerates drought better than maize.\n")
    make_pdf(root / "good.pdf", [["Napier grass is cut at one metre high."]])
    make_docx(root / "good.docx", "Rules", [("Delivery", ["Milk is delivered by 8 am."])])
    (root / "empty.md").write_text("")
    (root / "junk.txt").write_bytes(os.urandom(2048).replace(b"\x00", b"\x01") + b"\x00" * 64)
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage garbage\n%%EOF")
    make_encrypted_pdf(root / "locked.pdf", ["Secret board minutes."])
    make_blank_pdf(root / "scanned.pdf")
    (root / "broken.docx").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    (root / "huge.txt").write_text("x " * (600 * 1024))
    loop = root / "loop"
    loop.mkdir()
    (loop / "again").symlink_to(loop)
    (root / "self.md").symlink_to(root / "self.md")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return root


BAD = {
    "empty.md": "empty file",
    "junk.txt": "binary content",
    "corrupt.pdf": "corrupt PDF",
    "locked.pdf": "password-protected PDF",
    "scanned.pdf": "no text layer",
    "broken.docx": "broken DOCX",
    "huge.txt": "file too large",
    "loop/again": "symlink loop",
    "self.md": "symlink loop",
}


def test_each_bad_input_gets_one_clear_error_and_good_files_are_ingested(bad_folder):
    lines: list[str] = []
    result = ingest(IngestConfig(max_file_mb=1.0), bad_folder, log=lines.append)
    errors = _errors(result)
    for path, fragment in BAD.items():
        assert path in errors, f"{path} not reported; errors: {errors}"
        assert fragment in errors[path], f"{path}: {errors[path]!r} lacks {fragment!r}"
        assert sum(1 for line in lines if f" {path}:" in line) == 1, f"{path}: not exactly one output line"
    assert sorted(_docs(result)) == ["good.docx", "good.md", "good.pdf"]
    assert result.skipped == [{"path": "picture.png", "reason": "unsupported file type .png"}]


def test_unreadable_file_is_reported(tmp_path):
    root = tmp_path / "kb"
    root.mkdir()
    (root / "fine.md").write_text("# Fine\n\nBeans fix nitrogen in the soil.\n")
    secret = root / "secret.md"
    secret.write_text("# Secret\n\nNobody may read this file.\n")
    secret.chmod(0)
    code = ("import json, sys; from core.config import IngestConfig; from builder.ingest import run; "
            "r = run(IngestConfig(), sys.argv[1], log=lambda m: None); "
            "print(json.dumps({'errors': r.errors, 'docs': [d.source for d in r.documents]}))")
    cmd = [sys.executable, "-c", code, str(root)]
    if os.geteuid() == 0:
        # root reads anything; drop the capabilities that let it, as an ordinary user would be.
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["docs"] == ["fine.md"]
    assert data["errors"] == [{"path": "secret.md", "error": "unreadable: permission denied"}]


def test_sample_knowledge_base_ingests_cleanly():
    result = ingest(IngestConfig(), REPO / "knowledge", log=_quiet)
    formats = {d.format for d in result.documents}
    assert {"markdown", "html", "pdf", "docx", "csv", "qa-jsonl"} <= formats
    assert result.errors == []
    assert len(result.qa_pairs) >= 60
