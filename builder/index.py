"""Embed chunks with the (fine-tuned) embedder and write the FAISS index, BM25 index and chunk store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.bundle import BM25_DIR, CHUNKS_FILE, EMBEDDER_DIR, FAISS_FILE, INDEX_DIR, Chunk, write_chunks
from core.retrieval import BM25Index, DenseIndex, encode_texts
from core.text import split_header, split_sentences


def sentence_windows(chunks: Sequence[Chunk], size: int, stride: int = 1) -> tuple[list[str], list[int]]:
    """Texts of every run of ``size`` consecutive sentences of each chunk's body (stepping ``stride``, the
    last run always included), each after the chunk's header line, and the position of the chunk each
    comes from. A chunk of ``size`` sentences or fewer gets none: its own vector is that window."""
    if size < 1 or stride < 1:
        raise ValueError(f"window size and stride must be at least 1, got {size} and {stride}")
    texts: list[str] = []
    owner: list[int] = []
    for pos, chunk in enumerate(chunks):
        head, body = split_header(chunk.text)
        sents = split_sentences(body)
        if len(sents) <= size:
            continue
        starts = list(range(0, len(sents) - size + 1, stride))
        if starts[-1] != len(sents) - size:
            starts.append(len(sents) - size)
        for start in starts:
            window = " ".join(sents[start:start + size])
            texts.append(f"{head}\n{window}" if head else window)
            owner.append(pos)
    return texts, owner


def run(chunks: list[Chunk], bundle_dir: Path, device: str = "cpu", embeddings: np.ndarray | None = None,
        bm25_analyzer: dict | None = None, windows: int = 0, window_stride: int = 1) -> dict:
    """Write the (unfinished) bundle's index/{chunks.jsonl, dense.faiss (+ dense_owner.npy with windows), bm25/}
    with the embedder in its embedder/; returns counts for the manifest.

    ``embeddings`` (one row per chunk, from that embedder) skips embedding the chunks again. ``windows`` > 0 adds
    a vector per window of that many sentences (see ``sentence_windows``)."""
    index_dir = Path(bundle_dir) / INDEX_DIR
    index_dir.mkdir(parents=True, exist_ok=True)
    model = None
    if embeddings is not None and len(embeddings) == len(chunks):
        emb = np.asarray(embeddings, dtype=np.float32)
    else:
        model = load_embedder(Path(bundle_dir) / EMBEDDER_DIR, device)
        emb = encode_texts(model, [c.text for c in chunks], progress=True)
    owner = None
    n_windows = 0
    if windows:
        texts, win_owner = sentence_windows(chunks, windows, window_stride)
        n_windows = len(texts)
        if texts:
            model = model or load_embedder(Path(bundle_dir) / EMBEDDER_DIR, device)
            print(f"    embedding {len(texts)} sentence windows ({windows} sentences, stride {window_stride})",
                  flush=True)
            emb = np.concatenate([emb, encode_texts(model, texts, autocast_device=device, progress=True)])
            owner = np.concatenate([np.arange(len(chunks)), np.asarray(win_owner)])
    DenseIndex.build(emb, owner).save(index_dir / FAISS_FILE)
    bm25 = BM25Index.build([c.text for c in chunks], bm25_analyzer)
    bm25.save(index_dir / BM25_DIR)
    write_chunks(index_dir / CHUNKS_FILE, chunks)
    return {"chunks": len(chunks), "dim": int(emb.shape[1]), "faiss": "IndexFlatIP (cosine, exact)",
            "vectors": len(emb), "sentence_windows": {"size": windows, "stride": window_stride,
                                                           "count": n_windows},
            "bm25": bm25.analyzer}


def load_embedder(embedder_dir: Path, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_dir), device=device)
