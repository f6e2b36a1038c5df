"""Embed chunks with the (fine-tuned) embedder and write the FAISS index, BM25 index and chunk store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.retrieval import BM25_DIR, CHUNKS_FILE, FAISS_FILE, BM25Index, DenseIndex


def embed_texts(model, texts: Sequence[str], batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                        show_progress_bar=show_progress)


def run(chunks: list[dict], embedder_dir: Path, index_dir: Path, device: str = "cpu",
        embeddings: np.ndarray | None = None, bm25_analyzer: dict | None = None) -> dict:
    """Write index_dir/{chunks.jsonl, dense.faiss, bm25/}; returns counts for the manifest.

    ``embeddings`` (one row per chunk, from the embedder in embedder_dir) skips embedding the chunks again."""
    index_dir.mkdir(parents=True, exist_ok=True)
    if embeddings is not None and len(embeddings) == len(chunks):
        emb = np.asarray(embeddings, dtype=np.float32)
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(embedder_dir), device=device)
        emb = embed_texts(model, [c["text"] for c in chunks])
    DenseIndex.build(emb).save(index_dir / FAISS_FILE)
    bm25 = BM25Index.build([c["text"] for c in chunks], bm25_analyzer)
    bm25.save(index_dir / BM25_DIR)
    with open(index_dir / CHUNKS_FILE, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks)
    return {"chunks": len(chunks), "dim": int(emb.shape[1]), "faiss": "IndexFlatIP (cosine, exact)",
            "bm25": bm25.analyzer}
