"""Query-focused passages (core/focus.py): what the LLM reads of each retrieved chunk.

    .venv/bin/python -m pytest tests/test_focus.py -q
"""

from __future__ import annotations

import json

import pytest

from core.bundle import Bundle
from core.config import ConfigError, load_config
from core.focus import GAP, PassageFocus

CORPUS = [
    "Maize\nMaize is planted at the start of the long rains. Maize needs nitrogen.",
    "Maize\nMaize is weeded twice. Maize is sold to the cooperative.",
    "Beans\nBeans fix their own nitrogen and need little fertilizer.",
    "Coffee\nCoffee is pruned after harvest.",
]
PASSAGE = ("Maize > Fertilizer\n"
           "Maize is grown on most farms in the zone. "
           "The cooperative sells seed at the store. "
           "Apply 50 kg of DAP per acre at planting, in the furrow. "
           "Top-dress with CAN when the maize is knee high. "
           "Store the bags off the floor.")


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def focus() -> PassageFocus:
    return PassageFocus.from_texts(CORPUS, words, first_tokens=20, other_tokens=12, stemmer="english")


def test_a_passage_within_its_budget_is_given_whole(focus):
    assert focus.cut(PASSAGE, "How much DAP at planting?", budget=words(PASSAGE)) == PASSAGE
    assert focus.cut(PASSAGE, "How much DAP at planting?", budget=0) == PASSAGE


def test_cut_keeps_the_heading_and_the_sentences_that_answer_in_their_order(focus):
    out = focus.cut(PASSAGE, "How much DAP per acre at planting, and when to top-dress?", budget=26)
    head, body = out.split("\n")
    assert head == "Maize > Fertilizer"
    assert words(out) == 26  # heading 3, two gap marks, sentences of 12 and 9 words
    # the two sentences sharing the question's words, in the document's order, gaps marked
    assert body == (f"{GAP} Apply 50 kg of DAP per acre at planting, in the furrow. "
                    f"Top-dress with CAN when the maize is knee high. {GAP}")
    # One word less and the gap marks push it over: the weaker of the two sentences goes.
    tighter = focus.cut(PASSAGE, "How much DAP per acre at planting, and when to top-dress?", budget=25)
    assert tighter == f"Maize > Fertilizer\n{GAP} Apply 50 kg of DAP per acre at planting, in the furrow. {GAP}"


def test_a_rare_word_outweighs_a_common_one(focus):
    # "maize" is in most chunks, "cooperative" in one: the sentence with the rare word wins the only slot.
    text = "Notes\nMaize maize maize grows here. The cooperative buys it."
    assert focus.idf("cooper") > focus.idf("maiz")
    assert focus.cut(text, "maize cooperative", budget=6) == f"Notes\n{GAP} The cooperative buys it."


def test_a_long_first_line_is_a_paragraph_not_a_heading(focus):
    text = ("Maize is grown on most farms and the cooperative buys the crop at harvest time every year. "
            "Apply DAP at planting.\nStore the bags off the floor.")
    out = focus.cut(text, "When to apply DAP?", budget=10)
    assert out.startswith(GAP) and "Apply DAP at planting." in out and words(out) <= 10


def test_a_sentence_longer_than_the_budget_is_cut_word_by_word(focus):
    text = "Heading\n" + " ".join(["DAP"] + ["word"] * 40) + "."
    out = focus.cut(text, "DAP", budget=8)
    assert out.startswith("Heading\nDAP") and out.endswith(GAP) and words(out) <= 9


def test_apply_gives_the_first_passage_its_own_budget_and_leaves_the_input_alone(focus):
    passages = [{"text": PASSAGE, "source": "a.md"}, {"text": PASSAGE, "source": "b.md"}]
    out = focus.apply("How much DAP at planting?", passages)
    assert [p["source"] for p in out] == ["a.md", "b.md"]
    assert words(out[0]["text"]) <= 20 < words(PASSAGE) and words(out[1]["text"]) <= 12
    assert words(out[0]["text"]) > words(out[1]["text"])
    assert passages[0]["text"] == PASSAGE  # sources and citation grounding keep the whole chunk


def test_zero_budgets_turn_it_off():
    off = PassageFocus.from_texts(CORPUS, words, 0, 0)
    assert not off.enabled
    assert off.apply("DAP?", [{"text": PASSAGE}]) == [{"text": PASSAGE}]
    with pytest.raises(ValueError):
        PassageFocus.from_texts(CORPUS, words, -1, 0)


def test_config_refuses_negative_budgets():
    with pytest.raises(ConfigError, match="passage_tokens"):
        load_config("tiny", overrides=["retrieval.passage_tokens=-5"])


def test_bundle_budgets_come_from_the_manifest_else_the_config_defaults(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"bundle_id": "b", "retrieval": {"top_k": 3}}))
    defaults = load_config("tiny").retrieval
    assert Bundle.load(tmp_path).passage_tokens == (defaults.first_passage_tokens, defaults.passage_tokens)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"bundle_id": "b", "retrieval": {"first_passage_tokens": 0, "passage_tokens": 64}}))
    assert Bundle.load(tmp_path).passage_tokens == (0, 64)


def test_the_built_bundle_records_its_budgets(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    cfg = bundle.manifest["config"]["retrieval"]
    assert bundle.passage_tokens == (cfg["first_passage_tokens"], cfg["passage_tokens"])
    assert bundle.manifest["retrieval"]["passage_tokens"] == cfg["passage_tokens"]


def test_the_answer_evaluation_prompts_with_cut_passages_and_scores_citations_on_whole_ones(tiny_bundle, monkeypatch):
    from builder import evaluate_answers
    from core.config import config_from_dict
    from core.retrieval import Retriever

    bundle = Bundle.load(tiny_bundle)
    cfg = config_from_dict(bundle.manifest["config"])
    retriever = Retriever.load(bundle.path)
    questions = [json.loads(line) for line in (tiny_bundle / "eval" / "heldout.jsonl").open()][:3]
    focus = PassageFocus.from_texts([c.text for c in retriever.chunks], words, 6, 4, stemmer="english")
    seen: dict = {}

    def fake_generate(engine, model, batches, *args, **kwargs):
        seen.update(batches)
        # Every answer cites passage 1.
        return {name: {"texts": ["the answer [1]"] * len(b), "seconds": 1.0, "tokens": len(b)}
                for name, b in batches.items()}, "fake"

    monkeypatch.setattr(evaluate_answers, "generate_answers", fake_generate)
    report = evaluate_answers.evaluate_answers(retriever, questions, 3, "unused", cfg, systems=("base",), focus=focus)
    contexts, _ = evaluate_answers.retrieve_contexts(retriever, [q["question"] for q in questions], 3)
    for q, conversation, passages in zip(questions, seen["base"], contexts):
        user = conversation[-1]["content"]
        for p in focus.apply(q["question"], passages):
            assert p["text"] in user and words(p["text"]) <= 6
    from core.gold import GoldMatcher

    matcher = GoldMatcher(retriever.chunks)
    gold = [{retriever.chunks[i].chunk_id for i in matcher.gold(q)} for q in questions]
    expected = evaluate_answers.score(["the answer [1]"] * len(questions), questions, contexts, None, gold)
    assert report["base"]["citation_chunk_model"] == expected["citation_chunk_model"]
