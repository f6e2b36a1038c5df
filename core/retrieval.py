"""Retrieval over a bundle's index: dense (FAISS inner product), BM25, and their fusion.

The builder writes the index with these same functions and evaluates with this same Retriever, so what is
measured is what is served.

    python -c "from core.retrieval import Retriever; r = Retriever.load('bundles/latest'); \
print(r.search('When do I top-dress maize?')[0])"
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.bundle import (
    ANALYZER_FILE,
    BM25_DIR,
    CHUNKS_FILE,
    EMBEDDER_DIR,
    FAISS_FILE,
    FAISS_OWNER_SUFFIX,
    INDEX_DIR,
    Bundle,
    Chunk,
    ServedRetrieval,
    read_chunks,
)
from core.config import parse_fusion
from core.device import autocast_context
from core.text import STOPWORDS

_WORD = re.compile(r"[a-z0-9]+(?:[.,'][a-z0-9]+)*")

# How BM25 tokenizes and scores. Snowball English stemming lets "infected" match "infection"; k1/b are the
# Lucene defaults. Bigrams add a term per pair of neighbouring kept words ("lactic_acid"), a cheap stand-in for
# phrase matching (sequential dependence, Metzler and Croft 2005). A bundle records its analyzer beside its BM25
# index, so queries are always tokenized as the corpus was.
DEFAULT_ANALYZER = {"stemmer": "english", "k1": 1.2, "b": 0.75, "bigrams": True}


def bm25_tokenize(texts: Sequence[str], stemmer: str | None = None, bigrams: bool = False) -> list[list[str]]:
    """Lower-cased word tokens without stop words, stemmed with the named Snowball stemmer when given; with
    ``bigrams`` each text's tokens are followed by one "first_second" term per pair of neighbouring tokens (stop
    words already removed, so "gained favour in" and "gained favour" give the same pair)."""
    tokens = [[w for w in _WORD.findall(t.lower()) if w not in STOPWORDS] for t in texts]
    if stemmer:
        stem = _stemmer(stemmer).stemWords
        tokens = [stem(t) for t in tokens]
    if bigrams:  # "_" never occurs inside a word token, so a pair cannot collide with a word
        tokens = [t + [f"{u}_{v}" for u, v in itertools.pairwise(t)] for t in tokens]
    return tokens


_STEMMERS: dict[str, object] = {}


class TermStats:
    """Each chunk's stemmed words (no bigrams) and how many chunks hold each word: the IDF that passage focus
    (core/focus.py) and the abstention rule (core/abstention.py) weigh a question's words by."""

    def __init__(self, texts: Sequence[str], stemmer: str | None):
        self.stemmer = stemmer
        self.chunk_terms = [set(t) for t in bm25_tokenize(texts, stemmer)]
        self.doc_freq = Counter(w for t in self.chunk_terms for w in t)
        self.n_docs = max(len(self.chunk_terms), 1)

    def terms(self, text: str) -> set[str]:
        return set(bm25_tokenize([text], self.stemmer)[0])

    def idf(self, term: str) -> float:
        """BM25's IDF (Robertson-Sparck Jones, kept positive by the 1 +): highest for a word no chunk holds."""
        df = self.doc_freq.get(term, 0)
        return math.log(1 + (self.n_docs - df + 0.5) / (df + 0.5))


def _stemmer(name: str):
    if name not in _STEMMERS:
        import Stemmer  # PyStemmer: Snowball stemmers, C speed

        _STEMMERS[name] = Stemmer.Stemmer(name)
    return _STEMMERS[name]


@dataclass
class RetrievalResult:
    chunk_id: str
    source: str
    location: str
    title: str
    text: str
    score: float
    rank: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Lookup:
    """One query's retrieval: the ranked chunks (position, score), best first, and the best raw scores of the
    two candidate lists behind them (cosine of the best dense match; 0 when a list is empty)."""

    ranked: list[tuple[int, float]]
    dense_top: float
    bm25_top: float


def rrf_fuse(rankings: Sequence[Sequence[int]], k: int = 60, weights: Sequence[float] | None = None,
             limit: int | None = None) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum_i w_i / (k + rank_i(d)), ranks starting at 1.

    Ties keep the order in which documents were first seen (first ranking first), so the result is
    deterministic.
    """
    weights = weights or [1.0] * len(rankings)
    scores: dict[int, float] = {}
    order: dict[int, int] = {}
    for ranking, w in zip(rankings, weights):
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + w / (k + rank)
            order.setdefault(doc, len(order))
    fused = sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))
    return fused[:limit] if limit else fused


def zscore_fuse(scored: Sequence[Sequence[tuple[int, float]]], weights: Sequence[float] | None = None,
                limit: int | None = None) -> list[tuple[int, float]]:
    """Score fusion: each list's scores are standardized over that list's own candidates (z = (s - mean) / std),
    a chunk a list did not return takes that list's lowest z, and score(d) = sum_i w_i z_i(d).

    Unlike RRF it keeps how far apart the scores are, so a passage far ahead on one side is not pulled back to
    the pack by a middling rank on the other. An empty list adds nothing; a list whose scores are all equal adds
    0 to each of its chunks. Ties keep first-seen order, so the result is deterministic.
    """
    weights = weights or [1.0] * len(scored)
    zs: list[dict[int, float]] = []
    floors: list[float] = []
    order: dict[int, int] = {}
    for lst in scored:
        vals = [s for _, s in lst]
        if not vals:
            zs.append({})
            floors.append(0.0)
            continue
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
        z = {p: ((s - mean) / std if std > 1e-12 else 0.0) for p, s in lst}
        zs.append(z)
        floors.append(min(z.values()))
        for p, _ in lst:
            order.setdefault(p, len(order))
    fused = {p: sum(w * z.get(p, floor) for z, floor, w in zip(zs, floors, weights) if z)
             for p in order}
    ranked = sorted(fused.items(), key=lambda kv: (-kv[1], order[kv[0]]))
    return ranked[:limit] if limit else ranked


def within_gap(ranked: Sequence[tuple[int, float]], gap: float) -> list[tuple[int, float]]:
    """The head of a best-first list whose scores are within `gap` of the first one (the first always stays).
    gap <= 0 keeps the whole list."""
    if gap <= 0 or not ranked:
        return list(ranked)
    top = ranked[0][1]
    return [ranked[0]] + [(p, s) for p, s in ranked[1:] if top - s <= gap]


def fuse(dense: Sequence[Sequence[tuple[int, float]]], bm25: Sequence[Sequence[tuple[int, float]]], fusion: str,
         limit: int | None = None) -> list[list[tuple[int, float]]]:
    """Fuse each query's dense and BM25 candidates (position, score) the way ``fusion`` says (parsed once)."""
    name, param = parse_fusion(fusion)
    if name == "rrf":
        return [rrf_fuse([[p for p, _ in d], [p for p, _ in b]], k=int(param), limit=limit)
                for d, b in zip(dense, bm25)]
    return [zscore_fuse([d, b], weights=[param, 1.0 - param], limit=limit) for d, b in zip(dense, bm25)]


class BM25Index:
    """bm25s over the chunk texts, with our tokenizer (so query and corpus are tokenized alike).

    The analyzer (stemmer, k1, b, bigrams) is saved beside the index, so queries are always tokenized as the
    corpus was: both go through ``analyze``."""

    def __init__(self, retriever, n_docs: int, analyzer: dict):
        self._r = retriever
        self.n_docs = n_docs
        self.analyzer = dict(analyzer)

    @classmethod
    def build(cls, texts: Sequence[str], analyzer: dict | None = None) -> BM25Index:
        import bm25s

        analyzer = {**DEFAULT_ANALYZER, **(analyzer or {})}
        r = bm25s.BM25(k1=analyzer["k1"], b=analyzer["b"])
        r.index(cls.analyze(texts, analyzer), show_progress=False)
        return cls(r, len(texts), analyzer)

    @staticmethod
    def analyze(texts: Sequence[str], analyzer: dict) -> list[list[str]]:
        """The BM25 terms of ``texts`` under ``analyzer``; the one place index and queries are tokenized."""
        return bm25_tokenize(texts, analyzer["stemmer"], bool(analyzer["bigrams"]))

    def save(self, folder: Path) -> None:
        self._r.save(str(folder))
        (Path(folder) / ANALYZER_FILE).write_text(json.dumps(self.analyzer) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path, n_docs: int) -> BM25Index:
        import bm25s

        # Indexes written before bigrams existed record no "bigrams": they were built without them.
        analyzer = {"bigrams": False, **json.loads((Path(folder) / ANALYZER_FILE).read_text(encoding="utf-8"))}
        return cls(bm25s.BM25.load(str(folder)), n_docs, analyzer)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n_docs)
        terms = self.analyze(queries, self.analyzer)
        docs, scores = self._r.retrieve(terms, k=k, show_progress=False, n_threads=1)
        return np.asarray(docs), np.asarray(scores)


class DenseIndex:
    """Normalized embeddings in an exact FAISS inner-product index (cosine similarity).

    A chunk may own several vectors: its own, then (optionally) one per window of a few consecutive sentences,
    so that a question written from one sentence finds that sentence's chunk even when the rest of the chunk
    is about something else. ``owner`` maps every vector to its chunk's position (None: vector i is chunk i) and
    a chunk scores the best of its vectors ("max-sim"). Searches always return chunk positions."""

    def __init__(self, index, owner: np.ndarray | None = None):
        self.index = index
        self.owner = None if owner is None else np.asarray(owner, dtype=np.int64)
        if self.owner is not None and len(self.owner) != index.ntotal:
            raise ValueError(f"the dense index has {index.ntotal} vectors but its owner map {len(self.owner)}")

    @property
    def n_chunks(self) -> int:
        return int(self.owner.max()) + 1 if self.owner is not None and len(self.owner) else self.index.ntotal

    @classmethod
    def build(cls, embeddings: np.ndarray, owner: Sequence[int] | np.ndarray | None = None) -> DenseIndex:
        import faiss

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        faiss.normalize_L2(emb)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        return cls(index, None if owner is None else np.asarray(owner, dtype=np.int64))

    def chunk_vectors(self) -> DenseIndex:
        """This index with one vector per chunk (its own), without the sentence windows."""
        if self.owner is None:
            return self
        return DenseIndex.build(self.index.reconstruct_n(0, self.n_chunks))

    @staticmethod
    def owner_path(path: Path) -> Path:
        path = Path(path)
        return path.with_name(path.stem + FAISS_OWNER_SUFFIX)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))
        if self.owner is not None:
            np.save(self.owner_path(path), self.owner)
        else:
            self.owner_path(path).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> DenseIndex:
        import faiss

        owner = cls.owner_path(path)
        return cls(faiss.read_index(str(path)), np.load(owner) if owner.exists() else None)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk positions, scores), each (queries, k), best first; -1 pads where fewer chunks exist."""
        import faiss

        q = np.ascontiguousarray(query_emb, dtype=np.float32)
        faiss.normalize_L2(q)
        if self.owner is None:
            scores, ids = self.index.search(q, min(k, self.index.ntotal))
            return ids, scores
        k = min(k, self.n_chunks)
        ids_out = np.full((len(q), k), -1, dtype=np.int64)
        scores_out = np.full((len(q), k), -np.inf, dtype=np.float32)
        todo = np.arange(len(q))
        n = min(self.index.ntotal, 4 * k)
        while len(todo):
            scores, ids = self.index.search(q[todo], n)
            short = []
            for row, qi in enumerate(todo):
                best: dict[int, float] = {}
                for i, s in zip(ids[row], scores[row]):
                    if i >= 0:
                        c = int(self.owner[i])
                        if c not in best:  # FAISS returns vectors best first: a chunk's first is its best
                            best[c] = float(s)
                if len(best) < k and n < self.index.ntotal:
                    short.append(qi)
                    continue
                top = list(best.items())[:k]
                ids_out[qi, :len(top)] = [c for c, _ in top]
                scores_out[qi, :len(top)] = [s for _, s in top]
            todo = np.asarray(short, dtype=np.int64)
            n = min(self.index.ntotal, 4 * n)
        return ids_out, scores_out


def load_chunks(index_dir: Path) -> list[Chunk]:
    return read_chunks(Path(index_dir) / CHUNKS_FILE)


Encoder = Callable[[Sequence[str]], np.ndarray]


def encode_texts(model, texts: Sequence[str], *, autocast_device: str | None = None, batch_size: int = 64,
                 progress: bool = False) -> np.ndarray:
    """Normalized float32 embeddings of ``texts`` by a sentence-transformers model. With ``autocast_device``
    under the mixed precision training uses there (core.device.autocast_dtype), as the builder embeds the
    chunks; without, in the model's own dtype, as queries are embedded."""
    with autocast_context(autocast_device) if autocast_device else contextlib.nullcontext():
        emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=progress)
    return np.asarray(emb, dtype=np.float32)


def st_encoder(model) -> Encoder:
    """The query encoder of a Retriever: ``encode_texts`` in the model's own dtype."""
    return lambda texts: encode_texts(model, texts)


class Retriever:
    """Dense, BM25 or hybrid search over one bundle's chunks. Hybrid fuses the two candidate lists by
    reciprocal rank fusion ('rrf:K') or by standardized scores ('zscore:W')."""

    MODES = ("dense", "bm25", "hybrid")

    def __init__(self, chunks: list[Chunk], encoder: Encoder | None, dense: DenseIndex | None,
                 bm25: BM25Index | None, mode: str = "hybrid", candidates: int = 50, fusion: str = "rrf:60",
                 passage_gap: float = 0.0):
        if mode not in self.MODES:
            raise ValueError(f"retrieval mode must be one of {self.MODES}, got {mode!r}")
        parse_fusion(fusion)
        self.chunks = chunks
        self.encoder = encoder
        self.dense = dense
        self.bm25 = bm25
        self.mode = mode
        self.candidates = candidates
        self.fusion = fusion
        self.passage_gap = float(passage_gap or 0.0)  # see passages(); 0: always k passages
        self.last_timing_ms: float = 0.0

    @classmethod
    def from_index(cls, index_dir: Path, embedder_dir: Path, settings: ServedRetrieval, device: str = "cpu",
                   mode: str | None = None) -> Retriever:
        """A retriever over an index folder with an embedder folder, ranking as ``settings`` say (``mode``
        overrides theirs): a finished bundle's, or the unfinished one a build is writing."""
        from sentence_transformers import SentenceTransformer

        chunks = load_chunks(index_dir)
        model = SentenceTransformer(str(embedder_dir), device=device)
        return cls(chunks, st_encoder(model), DenseIndex.load(index_dir / FAISS_FILE),
                   BM25Index.load(index_dir / BM25_DIR, len(chunks)), mode=mode or settings.mode,
                   candidates=settings.candidates, fusion=settings.fusion, passage_gap=settings.passage_gap)

    @classmethod
    def load(cls, bundle: Bundle | str | Path, mode: str | None = None, device: str = "cpu") -> Retriever:
        """A bundle's served retriever; ``mode`` defaults to the one the build chose."""
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        return cls.from_index(bundle.file(INDEX_DIR), bundle.file(EMBEDDER_DIR), bundle.retrieval, device, mode)

    def candidates_for(self, queries: Sequence[str], n: int, mode: str = "hybrid") -> tuple[list[list[tuple[int, float]]] | None, list[list[tuple[int, float]]] | None]:
        """(dense, BM25) candidate lists of (position, score), best first, for each query; a part the mode does
        not use is None. Dense drops FAISS's empty slots, BM25 the chunks sharing no term with the query."""
        dense = bm = None
        if mode in ("dense", "hybrid"):
            ids, scores = self.dense.search(self.encoder(list(queries)), n)
            dense = [[(int(i), float(s)) for i, s in zip(ri, rs) if i >= 0] for ri, rs in zip(ids, scores)]
        if mode in ("bm25", "hybrid"):
            ids, scores = self.bm25.search(queries, n)
            bm = [[(int(i), float(s)) for i, s in zip(ri, rs) if s > 0] for ri, rs in zip(ids, scores)]
        return dense, bm

    def rank(self, queries: Sequence[str], k: int, mode: str | None = None) -> list[list[tuple[int, float]]]:
        """Chunk positions and scores, best first, for each query."""
        mode = mode or self.mode
        dense, bm = self.candidates_for(queries, max(k, self.candidates), mode)
        if mode == "dense":
            return [d[:k] for d in dense]
        if mode == "bm25":
            return [b[:k] for b in bm]
        return fuse(dense, bm, self.fusion, limit=k)

    def ranking_as(self, mode: str, fusion: str) -> Retriever:
        """This retriever (same chunks, models and indexes) ranking in ``mode`` with ``fusion``."""
        parse_fusion(fusion)
        if mode not in self.MODES:
            raise ValueError(f"retrieval mode must be one of {self.MODES}, got {mode!r}")
        other = copy.copy(self)
        other.mode, other.fusion = mode, fusion
        return other

    def lookup(self, queries: Sequence[str], k: int, trim: bool = True,
               exclude: Sequence[Collection[int]] | None = None) -> list[Lookup]:
        """Each query's retrieval as served: the ranked chunks (the LLM's passages with ``trim``, see passages())
        and the best raw dense and BM25 scores among the candidates, which the abstention rule reads
        (core.abstention). Both candidate lists are searched whatever the mode, so the scores always exist.
        ``exclude`` (a collection of chunk positions per query) searches as if those chunks were not in the
        index: how the evaluation asks the questions of a document that is left out."""
        n = max(k, self.candidates)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        dense, bm = self.candidates_for(queries, n + extra, "hybrid")
        if exclude:
            dense = [[(p, s) for p, s in d if p not in e][:n] for d, e in zip(dense, exclude)]
            bm = [[(p, s) for p, s in b if p not in e][:n] for b, e in zip(bm, exclude)]
        if self.mode == "dense":
            ranked = [d[:k] for d in dense]
        elif self.mode == "bm25":
            ranked = [b[:k] for b in bm]
        else:
            ranked = fuse(dense, bm, self.fusion, limit=k)
        if trim and self.gap_applies:
            ranked = [within_gap(r, self.passage_gap) for r in ranked]
        return [Lookup(r, d[0][1] if d else 0.0, b[0][1] if b else 0.0) for r, d, b in zip(ranked, dense, bm)]

    @functools.cached_property
    def term_stats(self) -> TermStats:
        """The chunks' word statistics, with the BM25 analyzer's stemmer; computed once, on first use."""
        return TermStats([c.text for c in self.chunks], self.stemmer)

    @property
    def stemmer(self) -> str | None:
        return self.bm25.analyzer.get("stemmer") if self.bm25 is not None else "english"

    @property
    def gap_applies(self) -> bool:
        """The passage gap needs scores on one scale for every query: z-score fusion's standardized ones."""
        return self.passage_gap > 0 and self.mode == "hybrid" and self.fusion.startswith("zscore")

    def passages(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """What the LLM is given for each query: the best k, less those whose fused score trails the first by
        more than passage_gap (z-score fusion only; otherwise all k). A clear winner then travels alone and a
        close call keeps its runners-up, so prompts are shorter where the extra passages would be noise."""
        return [found.ranked for found in self.lookup(queries, k)]

    def search(self, query: str, k: int = 4, mode: str | None = None, trim: bool = False) -> list[RetrievalResult]:
        """The best k chunks for one query; trim=True gives the LLM's passages instead (see passages())."""
        start = time.perf_counter()
        ranked = self.passages([query], k)[0] if trim and mode in (None, self.mode) else self.rank([query], k, mode)[0]
        self.last_timing_ms = (time.perf_counter() - start) * 1000
        return self.results(ranked)

    def results(self, ranked: Sequence[tuple[int, float]]) -> list[RetrievalResult]:
        """Ranked (position, score) pairs as the chunks they name."""
        results = []
        for rank, (pos, score) in enumerate(ranked, start=1):
            c = self.chunks[pos]
            results.append(RetrievalResult(c.chunk_id, c.source, c.location, c.title,
                                           c.text, round(score, 6), rank))
        return results
