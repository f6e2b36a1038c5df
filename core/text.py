"""Text helpers shared by every stage and by serving: normalization, content words, sentences, a chunk's header.

Index time and query time must agree on these (BM25 terms, which chunk holds an answer, which passage a citation
points at), so each lives here once.
"""

from __future__ import annotations

import re

# A short stop list: BM25 over small chunks is noticeably better without these, and it has to stay identical
# between index time and query time.
STOPWORDS = frozenset(
    ["a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "for", "by", "with", "from", "as", "is", "are",
     "was", "were", "be", "been", "being", "it", "its", "this", "that", "these", "those", "what", "which", "who",
     "whom", "how", "when", "where", "why", "do", "does", "did", "can", "could", "should", "would", "i", "you",
     "we", "they", "he", "she", "my", "our", "your", "their", "me", "us", "them", "if", "so", "not", "no",
     "there", "here", "into", "about", "than", "then", "also", "may"])

_WORD = re.compile(r"[a-z0-9]+")

# A sentence ends at . ! or ? followed by space and something that can start one. Sentence windows, cut passages
# and quoted training answers read as whole sentences.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
# The chunker's finer units: also at ; and : and line breaks, so long paragraphs can be packed and overlapped.
_CLAUSE_END = re.compile(r"(?<=[.!?;:])\s+(?=[\"'(\[A-Z0-9-])|\n+")


def normalize(text: str) -> str:
    """Lower case with runs of white space as one space: how answers are looked for inside chunks."""
    return re.sub(r"\s+", " ", text.lower()).strip()


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words, in order."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """The words that carry meaning: no stop words, nothing of one character."""
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 1}


def split_sentences(text: str) -> list[str]:
    """Whole sentences (at . ! ?), stripped, without empty ones."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def split_clauses(text: str) -> list[str]:
    """The chunker's units: sentences, also broken at ; and : and at line breaks."""
    return [s.strip() for s in _CLAUSE_END.split(text) if s and s.strip()]


def split_header(text: str) -> tuple[str, str]:
    """(header line, body) of a chunk's text: the chunker puts the title and heading path on the first line.
    A text of one line is all body."""
    head, _, body = text.partition("\n")
    return (head, body) if body else ("", head)
