"""Query-focused passages: what the LLM reads of each retrieved chunk.

A retrieved chunk answers a question with one or two of its sentences; the rest is context the model has to
read past. Each passage given to the LLM is cut to a token budget: its first line (the heading path or title
the chunker put there) stays, then the sentences sharing the most rare words with the question, in their
original order, with "…" where sentences were left out. A passage within its budget is given whole.

On a CPU, prefill bounds what a server can do, and a small model answers better from less text to read
past (the measurements are in BENCHMARKS.md's history).

Only the prompt is cut: sources shown to the user, citation grounding and scoring keep the whole chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from core.retrieval import TermStats, bm25_tokenize
from core.text import split_sentences

GAP = "…"

TokenCount = Callable[[str], int]


class PassageFocus:
    """Cuts passages to ``first_tokens`` (the best-ranked passage) and ``other_tokens`` (the rest) LLM tokens;
    0 leaves that passage whole. Words are weighted by their inverse document frequency over the chunks, with
    the BM25 analyzer's stemmer, so a sentence sharing "nitrogen" with the question outranks one sharing
    "maize" in a maize handbook."""

    def __init__(self, stats: TermStats, count_tokens: TokenCount, first_tokens: int = 0, other_tokens: int = 0):
        if first_tokens < 0 or other_tokens < 0:
            raise ValueError("passage token budgets must be 0 (whole) or positive")
        self.stats = stats
        self.count = count_tokens
        self.first_tokens, self.other_tokens = int(first_tokens), int(other_tokens)

    @classmethod
    def from_texts(cls, texts: Sequence[str], count_tokens: TokenCount, first_tokens: int = 0,
                   other_tokens: int = 0, stemmer: str | None = None) -> PassageFocus:
        # No statistics are needed when nothing is cut.
        stats = TermStats(texts if first_tokens or other_tokens else [], stemmer)
        return cls(stats, count_tokens, first_tokens, other_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.first_tokens or self.other_tokens)

    def idf(self, term: str) -> float:
        return self.stats.idf(term)

    def shared_weight(self, terms: set[str], other) -> float:
        """The IDF mass of the ``terms`` that ``other`` (terms of a sentence or a passage) holds too: how a
        sentence is weighed for a query, and (builder.chat_examples) how much of an answer a cut kept."""
        return sum(self.idf(t) for t in terms & set(other))

    def budget(self, rank: int) -> int:
        """The token budget of the passage at 0-based ``rank``."""
        return self.first_tokens if rank == 0 else self.other_tokens

    def cut(self, text: str, query: str, budget: int) -> str:
        """``text`` within ``budget`` tokens: first line, then the query's best sentences in order."""
        if budget <= 0 or self.count(text) <= budget:
            return text
        head, body = "", text
        if "\n" in text:
            first, _, rest = text.partition("\n")
            if self.count(first) <= budget // 2:  # a heading path or title, not the start of a paragraph
                head, body = first.strip(), rest
        sentences = split_sentences(body.replace("\n", " "))
        if not sentences:
            return text
        terms = self.stats.terms(query)
        weights = [self.shared_weight(terms, toks) for toks in bm25_tokenize(sentences, self.stats.stemmer)]
        left = budget - (self.count(head) if head else 0)
        keep: list[int] = []
        for i in sorted(range(len(sentences)), key=lambda i: (-weights[i], i)):
            n = self.count(sentences[i])
            if n <= left:
                keep.append(i)
                left -= n
        # The gap marks count too: while the assembled passage is over budget, the weakest kept sentence goes.
        keep.sort(key=lambda i: (-weights[i], i))
        while keep:
            out = self._assemble(head, sentences, sorted(keep))
            if self.count(out) <= budget:
                return out
            keep.pop()
        # Not one sentence fits: the best one, cut word by word.
        words = sentences[min(range(len(sentences)), key=lambda i: (-weights[i], i))].split()
        while words:
            out = "\n".join(p for p in (head, f"{' '.join(words)} {GAP}") if p)
            if self.count(out) <= budget:
                return out
            words = words[:len(words) * 3 // 4]
        return head or GAP

    @staticmethod
    def _assemble(head: str, sentences: list[str], keep: list[int]) -> str:
        parts: list[str] = []
        previous = -1
        for i in keep:
            if i != previous + 1:
                parts.append(GAP)
            parts.append(sentences[i])
            previous = i
        if previous != len(sentences) - 1:
            parts.append(GAP)
        kept = " ".join(parts)
        return f"{head}\n{kept}" if head else kept

    def apply(self, query: str, passages: Sequence[dict]) -> list[dict]:
        """Copies of ``passages`` (dicts with 'text') with each text cut to its rank's budget."""
        if not self.enabled:
            return [dict(p) for p in passages]
        return [{**p, "text": self.cut(p["text"], query, self.budget(i))} for i, p in enumerate(passages)]


def token_counter(tokenizer_dir: str) -> TokenCount:
    """Counts tokens with the LLM's own tokenizer (no special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def focus_for(retriever, tokenizer_dir: str, first_tokens: int, other_tokens: int) -> PassageFocus:
    """The focus for one bundle's retriever: its chunks' statistics (shared with the abstention rule), its BM25
    stemmer, the LLM's tokens."""
    if not (first_tokens or other_tokens):
        return PassageFocus(TermStats([], retriever.stemmer), lambda text: 0)
    return PassageFocus(retriever.term_stats, token_counter(tokenizer_dir), first_tokens, other_tokens)


def bundle_focus(bundle, retriever) -> PassageFocus:
    """The focus a served bundle uses: its manifest's budgets, its LLM's tokenizer, its retriever's chunks."""
    return focus_for(retriever, bundle.tokenizer_path(), *bundle.passage_tokens)
