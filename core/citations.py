"""Citation grounding: every citation marker points at the passage the cited text comes from.

A small model quotes the right passage far more often than it numbers it right: on COVID-QA the 135M adapter
wrote [1] after 178 of 200 answers, wherever the quote came from. The gateway therefore checks each marker
against the text it follows (the words since the previous marker):

- the cited passage holds that text (verbatim, or at least ``SUPPORT`` of its content words): kept;
- another passage holds it and the cited one does not: the marker is renumbered to that passage;
- neither: kept as the model wrote it (grounding never invents support it cannot see);
- an answer with no marker at all that one passage holds gets that passage's marker at its end;
- the refusal sentence is left alone.

``CitationGrounder`` does this on a stream (text is held back only from a '[' to its ']', a few characters),
``ground_citations`` on a whole answer. Evaluation applies the same function to the answers it scores, and
reports the model's own markers beside it (``citation_accuracy_model``).

    python -c "from core.citations import ground_citations as g; \
print(g('Wash hands often [1]', [{'text': 'Masks.'}, {'text': 'Wash hands often.'}]))"
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.prompting import is_refusal
from core.text import content_words, words

SUPPORT = 0.6  # share of a segment's content words a passage must hold to count as its source
_MARKER = re.compile(r"\[(\d{1,2})\]")
_OPEN = re.compile(r"\[\d{0,2}$")  # the start of a marker that may still be completing


def _norm(text: str) -> str:
    """The text's words joined by single spaces: verbatim matching that ignores case and punctuation."""
    return " ".join(words(text))


class _Passages:
    """Normalized passage texts and word sets, computed once per answer."""

    def __init__(self, passages: Sequence[dict]):
        self.norm = [f" {_norm(p.get('text', ''))} " for p in passages]
        self.words = [content_words(p.get("text", "")) for p in passages]

    def __len__(self) -> int:
        return len(self.norm)

    def support(self, segment: str) -> list[float]:
        """For each passage, how much of ``segment`` it holds: 1.0 verbatim, else the share of content words."""
        seg, words = _norm(segment), content_words(segment)
        if not words:
            return [0.0] * len(self.norm)
        out = []
        for norm, have in zip(self.norm, self.words):
            if len(seg) >= 12 and f" {seg} " in norm:
                out.append(1.0)
            else:
                out.append(len(words & have) / len(words))
        return out

    def source_of(self, segment: str, cited: int | None = None) -> int | None:
        """1-based passage to cite for ``segment``: ``cited`` when it holds the text, else the passage that
        holds most of it (ties: the earlier passage), None when no passage holds enough."""
        sup = self.support(segment)
        if not sup:
            return cited
        if cited is not None and 1 <= cited <= len(sup) and sup[cited - 1] >= SUPPORT:
            return cited
        best = max(range(len(sup)), key=lambda j: (sup[j], -j))
        if sup[best] >= SUPPORT and (cited is None or not 1 <= cited <= len(sup) or sup[best] > sup[cited - 1]):
            return best + 1
        return cited


class CitationGrounder:
    """Streaming form: ``feed(delta)`` returns the text that can be shown now, ``finish()`` the rest."""

    def __init__(self, passages: Sequence[dict]):
        self.passages = _Passages(passages)
        self.pending = ""  # held back: a '[' that may open a marker
        self.segment = ""  # text since the previous marker (the words a marker refers to)
        self.last_segment = ""  # for markers that follow other markers, e.g. "[1][2]"
        self.text = ""  # everything emitted so far
        self.markers = 0
        self.changed = 0

    def _emit_text(self, piece: str) -> str:
        self.segment += piece
        self.text += piece
        return piece

    def _emit_marker(self, number: int) -> str:
        segment = self.segment if self.segment.strip() else self.last_segment
        if self.segment.strip():
            self.last_segment = self.segment
        self.segment = ""
        new = self.passages.source_of(segment, number) if segment.strip() and len(self.passages) else number
        self.markers += 1
        self.changed += new != number
        out = f"[{new}]"
        self.text += out
        return out

    def feed(self, delta: str) -> str:
        buf = self.pending + delta
        self.pending = ""
        out = []
        while buf:
            m = _MARKER.search(buf)
            if m:
                out.append(self._emit_text(buf[:m.start()]))
                out.append(self._emit_marker(int(m.group(1))))
                buf = buf[m.end():]
                continue
            tail = _OPEN.search(buf)
            if tail:
                out.append(self._emit_text(buf[:tail.start()]))
                self.pending = buf[tail.start():]
            else:
                out.append(self._emit_text(buf))
            break
        return "".join(out)

    def finish(self) -> str:
        """Whatever was held back, plus a marker for an unmarked answer that one passage holds."""
        out = self._emit_text(self.pending) if self.pending else ""
        self.pending = ""
        if self.markers == 0 and len(self.passages) and self.text.strip() and not is_refusal(self.text):
            source = self.passages.source_of(self.text)
            if source is not None:
                self.changed += 1
                marker = f" [{source}]"
                self.text += marker
                out += marker
        return out


def ground_citations(answer: str, passages: Sequence[dict]) -> str:
    """The answer with each citation pointing at the passage that holds the text it follows (module docstring)."""
    if not passages or is_refusal(answer):
        return answer
    g = CitationGrounder(passages)
    return g.feed(answer) + g.finish()
