"""Split Documents into Chunks that respect structure and fit the embedder's input length.

A section (blocks under one heading path, on one page) is packed paragraph by paragraph up to
``max_tokens``; a paragraph that is too long is split by sentences, a sentence that is too long by token
windows. Consecutive chunks of one section overlap by whole sentences. Each chunk's text starts with its
document title and heading path, which the embedder and BM25 both see. Ids hash source and text, so an
unchanged passage keeps its id across rebuilds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from builder.ingest import Block, Document
from core.bundle import Chunk
from core.config import ChunkConfig
from core.text import split_clauses

TokenCounter = Callable[[Sequence[str]], list[int]]

def make_chunk_id(source: str, text: str) -> str:
    return hashlib.sha256(f"{source}\n{text}".encode()).hexdigest()[:16]


def header_for(doc: Document, block: Block) -> str:
    parts = [doc.title] + [h for h in block.headings if h and h != doc.title]
    if block.page is not None:
        parts.append(f"page {block.page}")
    return " > ".join(p for p in parts if p)


def hf_token_counter(tokenizer) -> TokenCounter:
    """Count tokens as the embedder will see them (special tokens included)."""
    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in enc]
    return count


def _windows(text: str, limit: int, count: TokenCounter) -> list[str]:
    """Split one over-long sentence into word windows that each fit."""
    words = text.split()
    out, current = [], []
    for w in words:
        trial = " ".join(current + [w])
        if current and count([trial])[0] > limit:
            out.append(" ".join(current))
            current = [w]
        else:
            current.append(w)
    if current:
        out.append(" ".join(current))
    return out


def chunk_section(doc: Document, blocks: list[Block], cfg: ChunkConfig, count: TokenCounter) -> list[Chunk]:
    header = header_for(doc, blocks[0])
    header_tokens = count([header + "\n"])[0]
    budget = max(16, cfg.max_tokens - header_tokens)
    # Units: the sentences (or table rows) of each block, flagged where a block ends.
    units: list[tuple[str, bool]] = []  # (text, ends_paragraph)
    for block in blocks:
        pieces = split_clauses(block.text) if block.kind == "text" else block.text.split("\n")
        pieces = [s for s in pieces if s.strip()]
        for i, s in enumerate(pieces):
            units.append((s, i == len(pieces) - 1))
    if not units:
        return []
    sizes = count([u for u, _ in units])
    expanded: list[tuple[str, bool, int]] = []
    for (text, end), size in zip(units, sizes):
        if size > budget:
            pieces = _windows(text, budget, count)
            psizes = count(pieces)
            for j, (p, ps) in enumerate(zip(pieces, psizes)):
                expanded.append((p, end and j == len(pieces) - 1, ps))
        else:
            expanded.append((text, end, size))

    def render(items: list[tuple[str, bool, int]]) -> str:
        body = ""
        for text, end, _ in items:
            body += text + ("\n\n" if end else " ")
        return f"{header}\n{body.strip()}"

    chunks: list[list[tuple[str, bool, int]]] = []
    current: list[tuple[str, bool, int]] = []
    used = 0
    for item in expanded:
        # Sub-word token counts are not additive across joins; leave a small margin per unit.
        if current and used + item[2] > budget:
            chunks.append(current)
            overlap: list[tuple[str, bool, int]] = []
            o_used = 0
            for prev in reversed(current):
                if o_used + prev[2] > cfg.overlap_tokens or len(overlap) + 1 >= len(current):
                    break
                overlap.insert(0, prev)
                o_used += prev[2]
            current, used = overlap, o_used
        current.append(item)
        used += item[2]
    if current:
        if chunks and used < cfg.min_tokens and sum(i[2] for i in chunks[-1]) + used <= budget:
            chunks[-1].extend(current)
        else:
            chunks.append(current)

    # Verify the real count: joins can push a chunk over the limit, so split it (in halves, then by word
    # windows) until every piece fits the embedder.
    location = blocks[0].location()
    out: list[Chunk] = []

    def emit(items: list[tuple[str, bool, int]]) -> None:
        text = render(items)
        n = count([text])[0]
        if n <= cfg.max_tokens:
            out.append(Chunk(make_chunk_id(doc.source, text), doc.source, location, doc.title, text, n,
                             blocks[0].kind))
        elif len(items) > 1:
            half = len(items) // 2
            emit(items[:half])
            emit(items[half:])
        else:
            words = items[0][0].split()
            if len(words) < 2:  # one unsplittable token run: keep it; the embedder truncates it
                out.append(Chunk(make_chunk_id(doc.source, text), doc.source, location, doc.title, text, n,
                                 blocks[0].kind))
                return
            mid = len(words) // 2
            emit([(" ".join(words[:mid]), False, 0), (" ".join(words[mid:]), items[0][1], 0)])

    for items in chunks:
        emit(items)
    return out


def sections(doc: Document) -> list[list[Block]]:
    """Consecutive blocks with the same heading path and page; a question/answer pair stands alone."""
    groups: list[list[Block]] = []
    for block in doc.blocks:
        if (groups and block.kind != "qa" and groups[-1][0].kind != "qa"
                and groups[-1][0].headings == block.headings and groups[-1][0].page == block.page):
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def run(cfg: ChunkConfig, documents: list[Document], count: TokenCounter) -> list[Chunk]:
    """Chunk every document; duplicate texts (same source and text) are kept once."""
    seen: set[str] = set()
    out: list[Chunk] = []
    for doc in documents:
        for group in sections(doc):
            for chunk in chunk_section(doc, group, cfg, count):
                if chunk.chunk_id not in seen:
                    seen.add(chunk.chunk_id)
                    out.append(chunk)
    return out
