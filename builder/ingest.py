"""Read every file of a knowledge folder into Documents, and question/answer files into QAPairs.

Bad input never stops the build and is never silent: each bad file yields one ``{"path", "error"}`` entry.

    python -c "from builder.ingest import run; from core.config import IngestConfig; \
print(run(IngestConfig(), 'knowledge').summary())"
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.config import IngestConfig

TEXT_EXTENSIONS = {".md", ".markdown", ".txt", ".text", ".rst"}
HTML_EXTENSIONS = {".html", ".htm"}
SUPPORTED = TEXT_EXTENSIONS | HTML_EXTENSIONS | {".pdf", ".docx", ".csv", ".jsonl"}


@dataclass
class Block:
    """A paragraph-sized piece of a document, with where it sits (heading path, page, row)."""

    text: str
    headings: tuple[str, ...] = ()
    page: int | None = None
    kind: str = "text"  # text | table | qa

    def location(self) -> str:
        parts = []
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.headings:
            parts.append(" > ".join(self.headings))
        return ", ".join(parts)


@dataclass
class Document:
    source: str  # path relative to the knowledge folder, POSIX separators
    title: str
    format: str
    blocks: list[Block]
    sha256: str

    @property
    def text(self) -> str:
        return "\n\n".join(b.text for b in self.blocks)


@dataclass
class QAPair:
    question: str
    answer: str
    source: str | None  # document the answer comes from, relative to the knowledge folder
    origin: str  # the question/answer file (and line) it was read from


@dataclass
class IngestResult:
    documents: list[Document] = field(default_factory=list)
    qa_pairs: list[QAPair] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # every file seen: path, sha256, bytes, format, status
    errors: list[dict] = field(default_factory=list)  # {"path", "error"}
    warnings: list[dict] = field(default_factory=list)  # {"path", "warning"}
    skipped: list[dict] = field(default_factory=list)  # unsupported file types: {"path", "reason"}

    def summary(self) -> str:
        return (f"{len(self.documents)} documents, {len(self.qa_pairs)} question/answer pairs, "
                f"{len(self.errors)} errors, {len(self.warnings)} warnings, {len(self.skipped)} skipped")


class IngestError(Exception):
    """One file could not be ingested; the message is what the user sees."""


# ----------------------------------------------------------------------------------------------- walking

def iter_files(root: Path, include_hidden: bool, on_error: Callable[[str, str], None]) -> Iterator[Path]:
    """Yield regular files below root in sorted order; report symlink loops and unreadable folders."""
    seen_dirs: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
        except OSError as exc:
            on_error(_rel(folder, root), f"unreadable folder: {exc.strerror or exc}")
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            on_error(_rel(folder, root), "symlink loop: this folder was already visited")
            return
        seen_dirs.add(key)
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            on_error(_rel(folder, root), f"unreadable folder: {exc.strerror or exc}")
            return
        for entry in entries:
            if not include_hidden and entry.name.startswith("."):
                continue
            try:
                st = entry.stat()  # follows symlinks; raises on loops and dangling links
            except RuntimeError:
                on_error(_rel(entry, root), "symlink loop")
                continue
            except OSError as exc:
                if exc.errno == 40:  # ELOOP
                    on_error(_rel(entry, root), "symlink loop")
                elif entry.is_symlink():
                    on_error(_rel(entry, root), "broken symlink: its target does not exist")
                else:
                    on_error(_rel(entry, root), f"unreadable: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from walk(entry)
            elif stat.S_ISREG(st.st_mode):
                yield entry
            else:
                on_error(_rel(entry, root), "not a regular file (device, socket or pipe)")

    yield from walk(root)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# ----------------------------------------------------------------------------------------------- decoding

def looks_binary(data: bytes) -> bool:
    """NUL bytes or a high share of control characters in the first 8 KiB: not text, whatever the extension."""
    head = data[:8192]
    if b"\x00" in head:
        # UTF-16 text has NULs too; a BOM says so.
        return not head.startswith((b"\xff\xfe", b"\xfe\xff"))
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    return controls > max(4, len(head) // 50)


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Decode bytes as UTF-8, else with a detected encoding. Returns (text, warning or None)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise IngestError("not valid text: no character encoding fits its bytes")
    return str(best), f"not UTF-8; decoded as {best.encoding}"


def _read_text(data: bytes, path: str, warn: Callable[[str, str], None]) -> str:
    if looks_binary(data):
        raise IngestError("binary content in a text file (NUL or control bytes)")
    text, warning = decode_text(data)
    if warning:
        warn(path, warning)
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ----------------------------------------------------------------------------------------------- parsers

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^(=+|-+)\s*$")


def parse_markdown(text: str) -> tuple[str, list[Block]]:
    """Paragraph blocks with their heading path; fenced code stays whole inside its paragraph."""
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    para: list[str] = []
    in_fence = False
    title = ""

    def flush() -> None:
        body = "\n".join(para).strip()
        para.clear()
        if body:
            blocks.append(Block(_clean_md(body), tuple(h for _, h in stack)))

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip().startswith(("```", "~~~")):
            in_fence = not in_fence
            para.append(line)
            continue
        if in_fence:
            para.append(line)
            continue
        m = _HEADING.match(line)
        setext = (para and len(para) == 1 and _SETEXT.match(line) and line.strip())
        if m or setext:
            if setext:
                heading, level = para.pop().strip(), 1 if line.strip()[0] == "=" else 2
            else:
                heading, level = m.group(2).strip(), len(m.group(1))
            flush()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, _clean_md(heading)))
            title = title or _clean_md(heading)
            continue
        if not line.strip():
            flush()
        else:
            para.append(line)
    flush()
    return title, [b for b in blocks if b.text]


def _clean_md(text: str) -> str:
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # images -> alt text
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links -> link text
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<!\w)[*_](\S.*?\S|\S)[*_](?!\w)", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    text = re.sub(r"^\s*>\s?", "", text, flags=re.MULTILINE)
    return text.strip()


def parse_plain(text: str) -> tuple[str, list[Block]]:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    title = paras[0].split("\n")[0][:120] if paras else ""
    return title, [Block(re.sub(r"[ \t]+", " ", p)) for p in paras]


def parse_html(text: str) -> tuple[str, list[Block]]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg", "nav", "footer", "head"]):
        if tag.name == "head":
            continue
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = soup.body or soup
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    for el in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "tr", "pre", "blockquote", "dd", "dt"]):
        if el.name[0] == "h" and el.name[1:].isdigit():
            level = int(el.name[1])
            while stack and stack[-1][0] >= level:
                stack.pop()
            heading = el.get_text(" ", strip=True)
            if heading:
                stack.append((level, heading))
                title = title or heading
            continue
        # Skip containers whose text another matched element already carries (li inside li, p inside li).
        if el.find_parent(["li", "tr", "pre", "blockquote", "p"]) is not None:
            continue
        if el.name == "tr":
            cells = [c.get_text(" ", strip=True) for c in el.find_all(["th", "td"])]
            line = " | ".join(c for c in cells if c)
            kind = "table"
        else:
            line = el.get_text(" ", strip=True)
            kind = "text"
            if el.name == "li":
                line = f"- {line}"
        line = re.sub(r"\s+", " ", line).strip()
        if line:
            blocks.append(Block(line, tuple(h for _, h in stack), kind=kind))
    return title, _merge_small(blocks)


def _merge_small(blocks: list[Block]) -> list[Block]:
    """Join list items and table rows of one section into one block, so a list reads as a paragraph."""
    out: list[Block] = []
    for b in blocks:
        if (out and out[-1].headings == b.headings and out[-1].page == b.page
                and (b.kind == "table" or b.text.startswith("- ")) and out[-1].kind == b.kind
                and (out[-1].text.startswith("- ") or out[-1].kind == "table")):
            out[-1] = Block(out[-1].text + "\n" + b.text, b.headings, b.page, b.kind)
        else:
            out.append(b)
    return out


def parse_pdf(data: bytes) -> tuple[str, list[Block]]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception:  # noqa: BLE001 - pypdf raises several types for unsupported encryption
                ok = 0
            if not ok:
                raise IngestError("password-protected PDF: cannot read it without the password")
        pages = list(reader.pages)
        texts = [(p.extract_text() or "") for p in pages]
    except IngestError:
        raise
    except FileNotDecryptedError:
        raise IngestError("password-protected PDF: cannot read it without the password") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise IngestError(f"corrupt PDF: {exc}") from None
    if not pages:
        raise IngestError("corrupt PDF: no pages")
    title = ""
    try:
        title = (reader.metadata.title or "") if reader.metadata else ""
    except Exception:  # noqa: BLE001 - metadata of a damaged file is optional
        title = ""
    blocks: list[Block] = []
    for number, text in enumerate(texts, start=1):
        for para in _pdf_paragraphs(text):
            blocks.append(Block(para, page=number))
    if not any(b.text.strip() for b in blocks):
        raise IngestError(f"PDF has no text layer ({len(pages)} pages, scanned images?); OCR is not enabled")
    title = title or blocks[0].text.split("\n")[0][:120]
    return title, blocks


def _pdf_paragraphs(text: str) -> list[str]:
    text = text.replace("\r", "\n")
    text = re.sub(r"-\n(?=[a-z])", "", text)  # words hyphenated across lines
    paras = re.split(r"\n\s*\n", text)
    if len(paras) <= 1:  # many extractors give single newlines only: split where a line ends a sentence short
        paras, current = [], []
        for line in text.split("\n"):
            current.append(line.strip())
            if line.strip().endswith((".", ":", "?", "!")) and len(line.strip()) < 60:
                paras.append(" ".join(current))
                current = []
        paras.append(" ".join(current))
    return [re.sub(r"\s+", " ", p).strip() for p in paras if p.strip()]


def parse_docx(data: bytes) -> tuple[str, list[Block]]:
    try:
        import docx
        from docx.table import Table
        from docx.text.paragraph import Paragraph

        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise IngestError(f"broken DOCX (not a valid Word zip package): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - python-docx raises PackageNotFoundError and lxml errors
        raise IngestError(f"broken DOCX: {type(exc).__name__}: {exc}") from None
    title = (document.core_properties.title or "").strip()
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []
    body = document.element.body
    for child in body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            para = Paragraph(child, document)
            text = para.text.strip()
            if not text:
                continue
            style = (para.style.name if para.style is not None else "") or ""
            m = re.match(r"(Heading|Title)\s*(\d*)", style)
            if m:
                level = int(m.group(2)) if m.group(2) else (0 if m.group(1) == "Title" else 1)
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, text))
                title = title or text
                continue
            prefix = "- " if "List" in style else ""
            blocks.append(Block(prefix + text, tuple(h for _, h in stack)))
        elif tag == "tbl":
            table = Table(child, document)
            rows = []
            for row in table.rows:
                cells = []
                for cell in row.cells:
                    t = cell.text.strip()
                    if t and (not cells or cells[-1] != t):  # merged cells repeat their text
                        cells.append(t)
                if cells:
                    rows.append(" | ".join(cells))
            if rows:
                blocks.append(Block("\n".join(rows), tuple(h for _, h in stack), kind="table"))
    return title, _merge_small(blocks)


QA_QUESTION_KEYS = ("question", "q", "query")
QA_ANSWER_KEYS = ("answer", "a", "response")


def parse_csv(text: str, path: str) -> tuple[str, list[Block], list[QAPair]]:
    """A CSV with question/answer columns is a QA file; any other CSV is a table, one block per row."""
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(io.StringIO(text), dialect))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise IngestError("empty CSV")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    q_col = next((lower.index(k) for k in QA_QUESTION_KEYS if k in lower), None)
    a_col = next((lower.index(k) for k in QA_ANSWER_KEYS if k in lower), None)
    s_col = lower.index("source") if "source" in lower else None
    blocks: list[Block] = []
    pairs: list[QAPair] = []
    title = Path(path).stem.replace("_", " ")
    for n, row in enumerate(rows[1:], start=2):
        cells = {header[i]: row[i].strip() for i in range(min(len(header), len(row))) if row[i].strip()}
        if not cells:
            continue
        if q_col is not None and a_col is not None:
            q = row[q_col].strip() if q_col < len(row) else ""
            a = row[a_col].strip() if a_col < len(row) else ""
            if not q or not a:
                continue
            src = row[s_col].strip() if s_col is not None and s_col < len(row) and row[s_col].strip() else None
            pairs.append(QAPair(q, a, src, f"{path}:{n}"))
            blocks.append(Block(f"Q: {q}\nA: {a}", (title, q), kind="qa"))
        else:
            blocks.append(Block("; ".join(f"{k}: {v}" for k, v in cells.items()), (title, f"row {n}"),
                                kind="table"))
    if not blocks:
        raise IngestError("CSV has a header but no data rows")
    return title, blocks, pairs


def parse_qa_jsonl(text: str, path: str, warn: Callable[[str, str], None]) -> tuple[str, list[Block], list[QAPair]]:
    blocks: list[Block] = []
    pairs: list[QAPair] = []
    title = Path(path).name.split(".")[0].replace("_", " ")
    bad = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            q, a = str(obj["question"]).strip(), str(obj["answer"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError):
            bad.append(n)
            continue
        if not q or not a:
            bad.append(n)
            continue
        src = obj.get("source") or None
        pairs.append(QAPair(q, a, str(src) if src else None, f"{path}:{n}"))
        blocks.append(Block(f"Q: {q}\nA: {a}", (title, q), kind="qa"))
    if bad:
        warn(path, f"{len(bad)} lines skipped (not a JSON object with question and answer): lines "
                   + ", ".join(map(str, bad[:10])) + ("..." if len(bad) > 10 else ""))
    if not pairs:
        raise IngestError("no valid question/answer lines ({\"question\", \"answer\", \"source\"?} per line)")
    return title, blocks, pairs


# ----------------------------------------------------------------------------------------------- driver

def format_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".qa.jsonl"):
        return "qa-jsonl"
    ext = path.suffix.lower()
    if ext in TEXT_EXTENSIONS:
        return "markdown" if ext in (".md", ".markdown") else "text"
    if ext in HTML_EXTENSIONS:
        return "html"
    return {".pdf": "pdf", ".docx": "docx", ".csv": "csv"}.get(ext)


def ingest_file(path: Path, rel: str, data: bytes, cfg: IngestConfig,
                warn: Callable[[str, str], None]) -> tuple[Document, list[QAPair]]:
    fmt = format_of(path)
    pairs: list[QAPair] = []
    if not data.strip():
        raise IngestError("empty file")
    if fmt == "pdf":
        if not data.startswith(b"%PDF"):
            raise IngestError("corrupt PDF: the file does not start with a PDF header")
        title, blocks = parse_pdf(data)
    elif fmt == "docx":
        if not data.startswith(b"PK"):
            raise IngestError("broken DOCX: not a zip package (wrong extension or damaged file)")
        title, blocks = parse_docx(data)
    else:
        text = _read_text(data, rel, warn)
        if fmt == "markdown":
            title, blocks = parse_markdown(text)
        elif fmt == "html":
            title, blocks = parse_html(text)
        elif fmt == "csv":
            title, blocks, pairs = parse_csv(text, rel)
        elif fmt == "qa-jsonl":
            title, blocks, pairs = parse_qa_jsonl(text, rel, warn)
        else:
            title, blocks = parse_plain(text)
    chars = sum(len(b.text) for b in blocks)
    if chars < cfg.min_chars and not pairs:
        raise IngestError(f"no usable text ({chars} characters extracted)")
    doc = Document(rel, title or Path(rel).stem, fmt or "text", blocks, hashlib.sha256(data).hexdigest())
    return doc, pairs


def run(cfg: IngestConfig, knowledge_dir: str | Path, log: Callable[[str], None] = print) -> IngestResult:
    """Ingest every supported file below knowledge_dir. Bad files are reported, never fatal."""
    root = Path(knowledge_dir)
    result = IngestResult()
    if not root.is_dir():
        raise FileNotFoundError(f"knowledge folder not found: {root}")

    def error(path: str, message: str) -> None:
        result.errors.append({"path": path, "error": message})
        log(f"  error    {path}: {message}")

    def warn(path: str, message: str) -> None:
        result.warnings.append({"path": path, "warning": message})
        log(f"  warning  {path}: {message}")

    limit = int(cfg.max_file_mb * 1024 * 1024)
    from tqdm.auto import tqdm

    # A progress bar on a terminal (tqdm hides itself when stderr is not a TTY, e.g. in CI logs).
    for path in tqdm(list(iter_files(root, cfg.include_hidden, error)), desc="ingest", unit="file",
                     disable=None, leave=False):
        rel = _rel(path, root)
        fmt = format_of(path)
        if fmt is None:
            result.skipped.append({"path": rel, "reason": f"unsupported file type {path.suffix or '(none)'}"})
            log(f"  skipped  {rel}: unsupported file type {path.suffix or '(none)'}")
            continue
        entry = {"path": rel, "format": fmt, "bytes": None, "sha256": None, "status": "error"}
        result.files.append(entry)
        try:
            size = path.stat().st_size
            entry["bytes"] = size
            if size > limit:
                raise IngestError(f"file too large ({size / 2**20:.1f} MiB > ingest.max_file_mb={cfg.max_file_mb})")
            try:
                data = path.read_bytes()
            except PermissionError:
                raise IngestError("unreadable: permission denied") from None
            except OSError as exc:
                raise IngestError(f"unreadable: {exc.strerror or exc}") from None
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            doc, pairs = ingest_file(path, rel, data, cfg, warn)
        except IngestError as exc:
            error(rel, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a parser bug on one file must not stop the build
            error(rel, f"could not parse: {type(exc).__name__}: {exc}")
            continue
        entry["status"] = "ok"
        result.documents.append(doc)
        result.qa_pairs.extend(pairs)
    return result
