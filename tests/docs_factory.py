"""Make real test documents (PDF with a text layer, scanned-like PDF, encrypted PDF, DOCX) in milliseconds."""

from __future__ import annotations

import io
from pathlib import Path


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A valid PDF whose pages carry the given lines as real text (Helvetica), xref offsets computed."""
    objects: list[bytes] = []
    n_pages = len(pages)
    font_id = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, lines in enumerate(pages):
        content_id = 4 + 2 * i
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_id} 0 R "
                       f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode())
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            ops.append(f"({_escape(line)}) Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objects.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{i} 0 obj\n".encode() + obj + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    path.write_bytes(out.getvalue())
    return path


def make_blank_pdf(path: Path, n_pages: int = 2) -> Path:
    """Pages with no text layer at all, like a scan without OCR."""
    from pypdf import PdfWriter

    w = PdfWriter()
    for _ in range(n_pages):
        w.add_blank_page(width=612, height=792)
    with open(path, "wb") as fh:
        w.write(fh)
    return path


def make_encrypted_pdf(path: Path, lines: list[str], password: str = "s3cret") -> Path:
    from pypdf import PdfReader, PdfWriter

    plain = make_pdf(path.with_suffix(".plain.pdf"), [lines])
    w = PdfWriter(clone_from=PdfReader(str(plain)))
    w.encrypt(user_password=password, owner_password=password, algorithm="RC4-128")
    with open(path, "wb") as fh:
        w.write(fh)
    plain.unlink()
    return path


def make_docx(path: Path, title: str, sections: list[tuple[str, list[str]]],
              table: list[list[str]] | None = None) -> Path:
    import docx

    d = docx.Document()
    d.add_heading(title, level=1)
    for heading, paras in sections:
        d.add_heading(heading, level=2)
        for p in paras:
            d.add_paragraph(p)
    if table:
        t = d.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                t.cell(r, c).text = cell
    d.save(str(path))
    return path


def make_chunk(text: str, source: str = "a.md", chunk_id: str | None = None, **fields):
    """A Chunk for tests that only care about some of its fields."""
    from core.bundle import Chunk

    return Chunk(chunk_id=chunk_id or f"{source}:{abs(hash(text)) % 10**8}", source=source,
                 location=fields.pop("location", ""), title=fields.pop("title", ""), text=text,
                 n_tokens=fields.pop("n_tokens", len(text.split())), **fields)


def reseal(bundle_dir) -> None:
    """Rewrite a bundle copy's manifest ``contents`` after a test changed its files on purpose (a bundle as
    another build would have written it), so the load-time check sees the bundle as whole."""
    import json
    from pathlib import Path

    from core.bundle import CONTENTS_KEY, MANIFEST, inventory

    path = Path(bundle_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest[CONTENTS_KEY] = inventory(bundle_dir)
    path.write_text(json.dumps(manifest, indent=2))
