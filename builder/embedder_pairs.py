"""The embedder's training data from the knowledge base.

- ``make_embedder_pairs``: (query, positive chunk, hard negatives) for the embedder. Supervision comes first: every training question is matched to the chunk that holds its
  answer. Generated questions (builder.generated_questions: written per chunk by a language model, kept after a
  round-trip retrieval check) come next; synthetic queries fill in where both are thin: section headings and
  document titles for their sections, inverse-cloze pairs (a sentence as the query, its chunk without the
  sentence as the positive). No synthetic pair has a generated-dev chunk as its positive.
  Hard negatives come from the base embedder and BM25, fused; a candidate that contains the answer (or the
  cloze sentence, or belongs to the heading's section) is a false negative and is dropped.

    python -c "from builder.embedder_pairs import heading_pairs; print(len(heading_pairs([])))"
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.generated_questions import sentences_for
from core.bundle import Chunk
from core.gold import GoldMatcher
from core.hashing import stable_fraction
from core.retrieval import BM25Index, rrf_fuse
from core.text import normalize, split_header

KINDS = ("question", "generated", "heading", "title", "ict")
SUPERVISED_KINDS = ("question",)  # written by people: trained on question_repeats times

# Inverse cloze: most of the time the sentence is cut from its chunk so the model must learn more than string
# overlap; a few pairs keep it, as in Lee et al. (2019), so exact matches are not unlearned.
ICT_KEEP_FRACTION = 0.1
# A positive found without the answer string in it (a paraphrased FAQ answer) is uncertain: a chunk of the same
# document that the base embedder scores within this relative margin of it, or above, may be another paraphrase
# of the answer, so it is not used as a negative.
NEGATIVE_MARGIN = 0.05
MINE_CANDIDATES = 30

Encoder = Callable[[Sequence[str]], np.ndarray]


# ----------------------------------------------------------------------------------------------- pairs

@dataclass
class EmbedderPair:
    """One training example for the embedder. Chunks are referred to by their position in the chunk list."""

    query: str
    positive: int
    kind: str  # one of KINDS
    relevant: list[int]  # every chunk that answers the query (never used as a negative)
    answer: str = ""  # a chunk containing this text (normalized) is relevant too
    positive_text: str | None = None  # set where the positive is not the chunk's own text (inverse cloze)
    exact: bool = True  # the positive was found by the answer string, not by word overlap
    source: str | None = None  # the question's document, where it named one
    negatives: list[int] = field(default_factory=list)

    def text(self, chunks: Sequence[Chunk]) -> str:
        return self.positive_text if self.positive_text is not None else chunks[self.positive].text

    def to_row(self, chunks: Sequence[Chunk], split: str) -> dict:
        row = {"query": self.query, "kind": self.kind, "split": split,
               "positive_chunk_id": chunks[self.positive].chunk_id,
               "negative_chunk_ids": [chunks[i].chunk_id for i in self.negatives]}
        if self.positive_text is not None:
            row["positive_text"] = self.positive_text
        if self.answer and self.kind in ("question", "generated"):
            row["answer"] = self.answer
        if self.source:
            row["source"] = self.source
        return row


def question_pairs(questions: Sequence[dict], chunks: Sequence[Chunk], kind: str = "question"
                   ) -> tuple[list[EmbedderPair], list[dict]]:
    """Supervised pairs from question/answer dicts; returns (pairs, questions that matched no chunk)."""
    matcher = GoldMatcher(chunks)
    pairs, unmatched = [], []
    for q in questions:
        found = matcher.training_positive(q)
        if found is None:
            unmatched.append(q)
            continue
        relevant, positive, exact = found
        pairs.append(EmbedderPair(q["question"], positive, kind, relevant, answer=q.get("answer", ""), exact=exact,
                                  source=q.get("source")))
    return pairs, unmatched


def heading_pairs(chunks: Sequence[Chunk]) -> list[EmbedderPair]:
    """A section heading (with its document title) asks for its section's first chunk; a document's title for
    its first chunk. Question/answer chunks are skipped: their heading is the question, already supervised."""
    sections: dict[tuple[str, str], list[int]] = {}
    first_of_doc: dict[str, int] = {}
    for i, c in enumerate(chunks):
        if c.kind == "qa":
            continue
        sections.setdefault((c.source, c.location), []).append(i)
        first_of_doc.setdefault(c.source, i)
    pairs = []
    titled: set[str] = set()
    for (source, location), members in sections.items():
        title = chunks[members[0]].title.strip()
        heading = location.split(" > ")[-1].strip() if location else ""
        heading = re.sub(r"^page \d+,?\s*", "", heading)
        if heading and heading != title:
            query = f"{title}: {heading}" if title else heading
            pairs.append(EmbedderPair(query, members[0], "heading", list(members)))
        elif title and source not in titled and first_of_doc[source] == members[0]:
            titled.add(source)
            pairs.append(EmbedderPair(title, members[0], "title", list(members)))
    return pairs


def ict_candidates(chunk: Chunk) -> list[str]:
    """Sentences of a chunk's body that make reasonable cloze queries (the chunk keeps at least one other)."""
    return sentences_for(chunk, min_sentences=2)


def ict_pair(chunks: Sequence[Chunk], pos: int, sentence: str, keep: bool) -> EmbedderPair:
    head, body = split_header(chunks[pos].text)
    rest = body if keep else re.sub(r"[ \t]{2,}", " ", body.replace(sentence, " ", 1)).strip()
    text = f"{head}\n{rest}" if head else rest
    return EmbedderPair(sentence, pos, "ict", [pos], answer=sentence, positive_text=text)


def synthetic_pairs(chunks: Sequence[Chunk], per_chunk: int, limit: int, supervised: dict[int, int],
                    seed: int = 0, exclude: Collection[int] = ()) -> list[EmbedderPair]:
    """Heading/title and inverse-cloze pairs taken in turn, at most ``limit`` in all, none with a positive in
    ``exclude``. Cloze queries go to thinly supervised chunks first, at most ``per_chunk`` per chunk, fewer where
    questions already point at the chunk."""
    out: list[EmbedderPair] = []
    headings = [p for p in heading_pairs(chunks) if p.positive not in exclude]
    cloze: list[EmbedderPair] = []
    order = sorted(range(len(chunks)),
                   key=lambda i: (supervised.get(i, 0), stable_fraction(chunks[i].chunk_id, seed)))
    for i in order:
        budget = max(0, per_chunk - supervised.get(i, 0))
        if not budget or chunks[i].kind == "qa" or i in exclude:
            continue
        rng = random.Random(f"{seed}:{chunks[i].chunk_id}")
        candidates = ict_candidates(chunks[i])
        rng.shuffle(candidates)
        cloze.extend(ict_pair(chunks, i, sentence, keep=rng.random() < ICT_KEEP_FRACTION)
                     for sentence in candidates[:budget])
        if len(cloze) >= limit:
            break
    for h, c in itertools.zip_longest(headings, cloze):
        for p in (h, c):
            if p is not None and len(out) < limit:
                out.append(p)
    return out


# ----------------------------------------------------------------------------------------------- negatives

class BaseRanker:
    """Base-embedder and BM25 rankings over the chunks, for mining and for the generated questions' round trip."""

    def __init__(self, chunks: Sequence[Chunk], encode: Encoder, chunk_embeddings: np.ndarray,
                 bm25_analyzer: dict | None = None):
        self.chunks = chunks
        self.encode = encode
        self.emb = np.asarray(chunk_embeddings, dtype=np.float32)
        self.bm25 = BM25Index.build([c.text for c in chunks], bm25_analyzer)

    def dense(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(top-k positions, the query-by-chunk score matrix)."""
        q = np.asarray(self.encode(list(queries)), dtype=np.float32)
        scores = q @ self.emb.T
        k = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return top, scores

    def fused(self, queries: Sequence[str], k: int, batch: int = 256) -> tuple[list[list[int]], list[np.ndarray]]:
        rankings, score_rows = [], []
        for start in range(0, len(queries), batch):
            part = list(queries[start:start + batch])
            top, scores = self.dense(part, k)
            bm_ids, bm_scores = self.bm25.search(part, k)
            for qi in range(len(part)):
                bm = [int(i) for i, s in zip(bm_ids[qi], bm_scores[qi]) if s > 0]
                rankings.append([d for d, _ in rrf_fuse([top[qi].tolist(), bm])])
                score_rows.append(scores[qi])
        return rankings, score_rows

    def rank(self, queries: Sequence[str], k: int) -> list[list[int]]:
        return [r[:k] for r in self.fused(queries, max(k, 10))[0]]


def mine_hard_negatives(pairs: list[EmbedderPair], chunks: Sequence[Chunk], ranker: BaseRanker, n: int,
                        candidates: int = MINE_CANDIDATES, margin: float = NEGATIVE_MARGIN) -> dict[str, int]:
    """Fill each pair's ``negatives`` with up to n chunks ranked high by base embedder + BM25 that do not answer
    it. Returns counts of the candidates dropped as false negatives, by reason."""
    dropped = {"relevant": 0, "contains_answer": 0, "same_text": 0, "too_close": 0}
    if n <= 0 or not pairs:
        return dropped
    norm_texts = [normalize(c.text) for c in chunks]
    rankings, score_rows = ranker.fused([p.query for p in pairs], candidates)
    for p, ranked, scores in zip(pairs, rankings, score_rows):
        relevant = set(p.relevant) | {p.positive}
        answer = normalize(p.answer) if p.answer else ""
        pos_text = norm_texts[p.positive]
        pos_score = float(scores[p.positive])
        chosen = []
        for c in ranked:
            if len(chosen) >= n:
                break
            if c in relevant:
                dropped["relevant"] += 1
            elif answer and answer in norm_texts[c]:
                dropped["contains_answer"] += 1
            elif norm_texts[c] == pos_text:
                dropped["same_text"] += 1
            elif (not p.exact and chunks[c].source == chunks[p.positive].source
                  and float(scores[c]) >= pos_score - margin * abs(pos_score)):
                dropped["too_close"] += 1
            else:
                chosen.append(c)
        p.negatives = chosen
    return dropped


# ----------------------------------------------------------------------------------------------- driver

def make_embedder_pairs(cfg, chunks: Sequence[Chunk], questions: Sequence[dict], ranker: BaseRanker,
                        generated: Sequence[dict] = (), exclude: Collection[int] = ()) -> tuple[list[EmbedderPair], dict]:
    """Every training pair for the embedder (``cfg`` is the BuildConfig) and counts for the manifest: the real
    ``questions``, the ``generated`` ones (question dicts of builder.generated_questions), then synthetic queries,
    none of them on a chunk in ``exclude``. ``ranker`` (the base embedder and BM25) mines the hard negatives."""
    dcfg = cfg.datagen
    supervised, unmatched = question_pairs(questions, chunks)
    # Generated and synthetic pairs share one budget (datagen.max_synthetic): it bounds the stage's time.
    written, _ = question_pairs([q for q in generated if q["gold"][0] not in exclude][:dcfg.max_synthetic], chunks,
                                kind="generated")
    counts: dict[int, int] = {}
    for p in supervised + written:
        counts[p.positive] = counts.get(p.positive, 0) + 1
    synthetic = synthetic_pairs(chunks, dcfg.synthetic_per_chunk, max(0, dcfg.max_synthetic - len(written)), counts,
                                cfg.seed, exclude)
    pairs = (supervised + written + synthetic)[:cfg.embedder.max_pairs]
    # Repeated question pairs get a fresh negative on each repeat, so mine enough for all of them.
    dropped = mine_hard_negatives(pairs, chunks, ranker, dcfg.hard_negatives * max(1, cfg.embedder.question_repeats))
    for p in pairs:
        if p.kind not in SUPERVISED_KINDS:
            p.negatives = p.negatives[:dcfg.hard_negatives]
    stats: dict[str, Any] = {k: sum(p.kind == k for p in pairs) for k in KINDS}
    stats.update({"pairs": len(pairs), "unmatched_questions": len(unmatched),
                  "inexact_positives": sum(not p.exact for p in pairs), "false_negatives_dropped": dropped,
                  "negatives_per_pair": round(sum(len(p.negatives) for p in pairs) / max(1, len(pairs)), 2)})
    return pairs, stats


def split_pairs(pairs: Sequence[EmbedderPair], eval_fraction: float, seed: int = 0
                ) -> tuple[list[EmbedderPair], list[EmbedderPair]]:
    """A deterministic held-out share of the pairs (by a hash of the query) for the promotion gate."""
    train, held = [], []
    for p in pairs:
        (held if stable_fraction(f"pair:{p.query}", seed) < eval_fraction else train).append(p)
    return train, held


def write_pairs(path: Path, train: Sequence[EmbedderPair], held: Sequence[EmbedderPair], chunks: Sequence[Chunk]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for split, rows in (("train", train), ("eval", held)):
            fh.writelines(json.dumps(p.to_row(chunks, split), ensure_ascii=False) + "\n" for p in rows)
    return path
