"""Which chunks answer a question: the one matcher behind evaluation, embedder pairs and chat examples.

A question is ``{"question", "answer", "source"?}``. The chunks that hold its answer verbatim (normalized) are
found first, inside its source document where it names one that was ingested; where none does, the chunk
sharing most of the answer's content words stands in. What each caller makes of that differs on purpose and is
written out in its own method:

- ``relevant`` (retrieval metrics): the verbatim chunks, else the whole source document (the document is the
  unit when the answer was paraphrased);
- ``training_positive`` (embedder pairs): prose before question/answer chunks (a QA chunk restates a pair, it
  is the positive only when nothing else is), and whether the positive was found by the answer string;
- ``gold`` (chat examples): the verbatim chunks, else the best overlap; never the question's own QA chunk,
  which a held-out question would never find in the index.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.bundle import Chunk
from core.text import content_words, normalize


def group_by_source(chunks: Sequence[Chunk]) -> dict[str, list[int]]:
    """Chunk positions of each document, in chunk order."""
    out: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        out.setdefault(c.source, []).append(i)
    return out


def is_own_qa_chunk(question: str, chunk: Chunk) -> bool:
    """A question/answer chunk that restates this very question."""
    return chunk.kind == "qa" and normalize(question) in normalize(chunk.text)


class GoldMatcher:
    """The chunks' normalized texts, content words and documents, computed once for many questions."""

    def __init__(self, chunks: Sequence[Chunk]):
        self.chunks = chunks
        self.norm = [normalize(c.text) for c in chunks]
        self.words = [content_words(c.text) for c in chunks]
        self.by_source = group_by_source(chunks)

    def _source(self, question: dict) -> str | None:
        """The question's document, if it was ingested."""
        source = question.get("source")
        return source if source and source in self.by_source else None

    def _holding(self, answer: str, pool: Sequence[int]) -> list[int]:
        return [i for i in pool if answer and answer in self.norm[i]]

    def _best_overlap(self, question: dict, pool: Sequence[int], answer_first: bool) -> tuple[int | None, float]:
        """The chunk sharing most content words with the answer and the question (the answer's share first when
        ``answer_first``, else the question's), first on ties; and its share of the answer's words when
        ``answer_first``, else of the question's."""
        answer_words = content_words(question.get("answer", ""))
        question_words = content_words(question.get("question", ""))
        best, best_key = None, (-1.0, -1.0)
        for i in pool:
            a = len(answer_words & self.words[i]) / len(answer_words) if answer_words else 0.0
            q = len(question_words & self.words[i]) / len(question_words) if question_words else 0.0
            key = (a, q) if answer_first else (q, a)
            if key > best_key:
                best, best_key = i, key
        return best, best_key[0]

    def relevant(self, question: dict) -> set[int]:
        """Positions counted as relevant when retrieval is scored (module docstring). A question whose source
        was not ingested has none, so it is left out of the averages."""
        answer = normalize(question.get("answer", ""))
        source = question.get("source")
        if source:
            pool = self.by_source.get(source, [])
            return set(self._holding(answer, pool)) or set(pool)
        return set(self._holding(answer, range(len(self.chunks))))

    def training_positive(self, question: dict, min_overlap: float = 0.5) -> tuple[list[int], int, bool] | None:
        """(relevant positions, positive, exact) for an embedder pair, or None when nothing plausible holds the
        answer. Without a source, an inexact positive must share at least ``min_overlap`` of the answer's words."""
        answer = normalize(question.get("answer", ""))
        source = self._source(question)
        everything = list(self.by_source[source] if source else range(len(self.chunks)))
        pool = [i for i in everything if self.chunks[i].kind != "qa"] or everything
        hits = self._holding(answer, pool) or self._holding(answer, everything)
        if hits:
            return hits, self._best_overlap(question, hits, answer_first=False)[0], True
        if not answer:
            return None
        best, overlap = self._best_overlap(question, pool, answer_first=True)
        if best is None or (not source and overlap < min_overlap):
            return None
        return [best], best, False

    def gold(self, question: dict, min_overlap: float = 0.5) -> list[int]:
        """Positions of the chunks a chat example may cite for the question, best first; [] when none plausibly
        holds the answer (without a source, the best overlap must reach ``min_overlap``)."""
        answer = normalize(question.get("answer", ""))
        if not answer:
            return []
        source = self._source(question)
        pool = self.by_source[source] if source else range(len(self.chunks))
        pool = [i for i in pool if not is_own_qa_chunk(question["question"], self.chunks[i])]
        hits = self._holding(answer, pool)
        if hits:
            return hits
        best, overlap = self._best_overlap(question, pool, answer_first=True)
        if best is None or overlap <= 0 or (not source and overlap < min_overlap):
            return []
        return [best]
