"""Citation grounding: markers point at the passage that holds the text they follow, on whole answers and
on streams split anywhere."""

from __future__ import annotations

import pytest

from core.citations import CitationGrounder, ground_citations
from core.prompting import REFUSAL

PASSAGES = [
    {"text": "Beans > Planting\nSow beans at the start of the long rains, 10 cm apart in rows."},
    {"text": "Maize > Fertilizer\nApply 50 kg of DAP per acre at planting, mixed with the soil."},
    {"text": "Maize > Spacing\nPlant hybrid maize 75 cm between rows and 25 cm between holes."},
]


@pytest.mark.parametrize("answer,expected", [
    # the cited passage holds the quote: kept
    ("Apply 50 kg of DAP per acre at planting. [2]", "Apply 50 kg of DAP per acre at planting. [2]"),
    # the quote is in passage 2, the model wrote [1]: renumbered
    ("Apply 50 kg of DAP per acre at planting. [1]", "Apply 50 kg of DAP per acre at planting. [2]"),
    # each marker is checked against the text since the previous one
    ("Use 50 kg of DAP per acre [1]. Rows 75 cm apart, holes 25 cm [1].",
     "Use 50 kg of DAP per acre [2]. Rows 75 cm apart, holes 25 cm [3]."),
    # a marker right after another refers to the same text
    ("Apply 50 kg of DAP per acre at planting [2][1]", "Apply 50 kg of DAP per acre at planting [2][2]"),
    # no passage holds the text: the model's marker stays, even one that points at no passage
    ("Irrigate every third day. [1]", "Irrigate every third day. [1]"),
    ("Irrigate every third day. [9]", "Irrigate every third day. [9]"),
    # an out-of-range marker after a quote is pointed at the passage holding it
    ("Sow beans at the start of the long rains [7]", "Sow beans at the start of the long rains [1]"),
    # an unmarked answer that one passage holds gets its marker; one no passage holds stays unmarked
    ("Plant hybrid maize 75 cm between rows", "Plant hybrid maize 75 cm between rows [3]"),
    ("Ask your extension officer", "Ask your extension officer"),
    # the refusal is never cited
    (REFUSAL, REFUSAL),
])
def test_ground_citations(answer, expected):
    assert ground_citations(answer, PASSAGES) == expected


def test_without_passages_the_answer_is_unchanged():
    assert ground_citations("Apply 50 kg of DAP [3]", []) == "Apply 50 kg of DAP [3]"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_streaming_gives_the_same_text_however_the_deltas_split(size):
    answer = "Use 50 kg of DAP per acre [1]. Rows 75 cm apart, holes 25 cm [1]. See [12"
    g = CitationGrounder(PASSAGES)
    shown = "".join(g.feed(answer[i:i + size]) for i in range(0, len(answer), size)) + g.finish()
    assert shown == ground_citations(answer, PASSAGES)
    assert shown.startswith("Use 50 kg of DAP per acre [2]. Rows 75 cm apart, holes 25 cm [3].")
    assert shown.endswith("See [12")  # an unfinished marker is released as text at the end
    assert g.changed == 2


def test_text_is_held_back_only_while_a_marker_may_be_completing():
    g = CitationGrounder(PASSAGES)
    assert g.feed("Apply 50 kg of DAP per acre ") == "Apply 50 kg of DAP per acre "
    assert g.feed("[") == ""
    assert g.feed("1") == ""
    assert g.feed("] then") == "[2] then"
    assert g.feed(" [x]") == " [x]"  # not a marker: released at once
