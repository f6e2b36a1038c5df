"""Answer evaluation: scoring, citations, the unanswerable set, generation engines and `assistant eval`."""

from __future__ import annotations

import json

import pytest

from builder import evaluate_answers
from core.hf_engine import generate_batches, merge_adapter
from core.prompting import REFUSAL
from tests.docs_factory import make_chunk

Q = {"question": "How much DAP per acre at planting?", "answer": "50 kg of DAP per acre", "source": "crops/maize.md"}
GOLD = {"text": "Maize > Fertilizer\nApply 50 kg of DAP per acre at planting.", "source": "crops/maize.md"}
OTHER = {"text": "Beans > Fertilizer\nBeans need little nitrogen.", "source": "crops/beans.md"}


def test_scores_answers_citations_and_refusals():
    answers = ["50 kg of DAP per acre [2]", "Use 50 kg of DAP per acre [1]", "Fifty kilos. [9]", REFUSAL]
    questions = [Q] * 4
    contexts = [[OTHER, GOLD]] * 4
    m = evaluate_answers.score(answers, questions, contexts, unanswerable=[REFUSAL, "Plant in March [1]"])
    assert m["exact_match"] == 0.25  # the citation marker is not part of the answer
    second = 2 * (6 / 7) / (6 / 7 + 1)  # "use" is one extra token: precision 6/7, recall 1
    assert m["f1"] == pytest.approx((1 + second) / 4, abs=1e-4)
    assert m["rouge_l"] == pytest.approx((1 + second) / 4, abs=1e-4)
    # The model's markers: [2] is the gold document; [1] is another document; [9] points at no passage; the
    # refusal cites nothing. As served, the [1] after a quote of the gold passage is grounded to [2].
    assert m["citation_chunk_model"] == 0.25
    assert m["citation_served"] == 0.5
    assert m["false_refusal"] == 0.25
    assert m["refusal_unanswerable"] == 0.5
    assert m["f1_ci"][0] <= m["f1"] <= m["f1_ci"][1]


def test_without_retrieval_there_is_no_citation_or_refusal_score():
    m = evaluate_answers.score(["50 kg of DAP per acre"], [Q], None, None)
    assert m["exact_match"] == 1.0 and "citation_served" not in m and "refusal_unanswerable" not in m


def test_a_question_without_source_is_cited_correctly_by_a_passage_holding_its_answer():
    q = dict(Q, source=None)
    assert evaluate_answers.cites_gold("It is 50 kg of DAP per acre [2]", [OTHER, GOLD], q)
    assert not evaluate_answers.cites_gold("It is 50 kg of DAP per acre [1]", [OTHER, GOLD], q)


def test_the_scored_subset_is_deterministic_and_independent_of_order():
    qs = [{"question": f"question {i}?", "answer": "a"} for i in range(50)]
    a = evaluate_answers.select_questions(qs, 10)
    assert len(a) == 10 and a == evaluate_answers.select_questions(list(reversed(qs)), 10)
    assert evaluate_answers.select_questions(qs, None) == evaluate_answers.select_questions(qs, 0) and len(
        evaluate_answers.select_questions(qs, None)) == 50


class FakeRetriever:
    """Ranks every chunk, those sharing the most words with the query first; ``lookup`` as core.retrieval's."""

    candidates = 50

    def __init__(self, chunks):
        self.chunks = chunks

    def rank(self, queries, k, mode=None):
        out = []
        for q in queries:
            words = set(q.lower().split())
            scored = sorted(range(len(self.chunks)),
                            key=lambda i: (-len(words & set(self.chunks[i].text.lower().split())), i))
            out.append([(i, 1.0) for i in scored[:k]])
        return out

    def lookup(self, queries, k, trim=True, exclude=None):
        from core.retrieval import Lookup

        ranked = self.rank(queries, len(self.chunks))
        exclude = exclude or [()] * len(queries)
        return [Lookup([(i, s) for i, s in r if i not in e][:k], 0.5, 1.0) for r, e in zip(ranked, exclude)]


def _chunks():
    chunks = []
    for d in range(5):
        for p in range(3):
            chunks.append(make_chunk(f"doc{d} part{p}: the answer for topic{d} is value{d}{p} and more words",
                                     f"doc{d}.md", f"{d}-{p}"))
    return chunks


def test_unanswerable_cases_are_retrieved_without_the_answering_documents_plus_off_topic_and_not_indexed():
    from builder.abstention import off_topic

    chunks = _chunks()
    qs = [{"question": f"what is the answer for topic{d} part{p}?", "answer": f"value{d}{p}", "source": f"doc{d}.md"}
          for d in range(5) for p in range(3)]
    cases = evaluate_answers.unanswerable_cases(FakeRetriever(chunks), qs, top_k=3,
                                                not_indexed=["what is the answer for topic9?"])
    left = [c for c in cases if c[2] == "document_left_out"]
    assert len(left) == max(1, int(len(qs) * evaluate_answers.UNANSWERABLE_SHARE))
    assert [c[0] for c in cases if c[2] == "off_topic"] == off_topic("test")
    assert [c[0] for c in cases if c[2] == "not_indexed"] == ["what is the answer for topic9?"]
    by_q = {q["question"]: q for q in qs}
    for question, passages, _, lookup in left:
        q = by_q[question]
        # The system's own retrieval over the rest of the index: no chunk of the answering document.
        assert len(passages) == 3 and [p["chunk_id"] for p in passages] == [chunks[i].chunk_id for i, _ in lookup.ranked]
        assert all(p["source"] != q["source"] and q["answer"] not in p["text"] for p in passages)
    assert cases == evaluate_answers.unanswerable_cases(FakeRetriever(chunks), qs, top_k=3,
                                                        not_indexed=["what is the answer for topic9?"])


def test_answers_are_scored_as_served_where_the_rule_abstains_and_citations_on_the_models_own_output():
    answers = ["50 kg of DAP per acre [2]", "50 kg of DAP per acre [2]"]
    contexts = [[OTHER, GOLD]] * 2
    m = evaluate_answers.score(answers, [Q, Q], contexts, unanswerable=["Plant in March [1]", "It is blue [1]"],
                               abstained=[False, True], unanswerable_abstained=[True, False],
                               unanswerable_kinds=["off_topic", "document_left_out"])
    assert m["f1"] == 0.5 and m["f1_without_abstention"] == 1.0  # the refused one scores 0
    assert m["false_refusal"] == 0.5 and m["abstained"] == 0.5
    assert m["citation_chunk_model"] == 1.0  # the model's own markers, whatever the rule did
    assert m["citation_served"] == 0.5  # the served refusal cites nothing
    assert m["refusal_unanswerable"] == 0.5 and m["refusal_unanswerable_model"] == 0.0
    assert m["refusal_by_kind"] == {"off_topic": 1.0, "document_left_out": 0.0}


@pytest.fixture(scope="module")
def tiny_model_and_adapter(tmp_path_factory):
    """A random tiny Llama and a random (non-zero) LoRA adapter for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.models import build_tiny_llama

    root = tmp_path_factory.mktemp("tiny-gen")
    base = build_tiny_llama([c.text for c in _chunks()] * 20, root / "base", seed=1, vocab_size=400)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(root / "adapter")
    from builder.lora_trainer import load_tokenizer

    load_tokenizer(base).save_pretrained(root / "adapter")
    return str(base), str(root / "adapter")


def test_hf_generation_answers_plain_batches_without_the_adapter_and_lora_batches_with_it(tiny_model_and_adapter):
    base, adapter = tiny_model_and_adapter
    convs = [[{"role": "user", "content": f"what is the answer for topic{i}?"}] for i in range(3)]
    plain = generate_batches(base, {"x": convs}, 8)
    both = generate_batches(base, {"x": convs, "y": convs}, 8, adapter=adapter, lora_batches=["y"])
    assert both["x"]["texts"] == plain["x"]["texts"]
    assert both["y"]["texts"] != plain["x"]["texts"]
    assert all(r["tokens"] > 0 and r["seconds"] >= 0 for r in both.values())


def test_merged_weights_compute_what_base_plus_adapter_computes(tiny_model_and_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = tiny_model_and_adapter
    merged = merge_adapter(base, adapter, tmp_path / "merged")
    assert (merged / "tokenizer.json").is_file() and not (merged / "adapter_config.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        via_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    assert torch.allclose(via_adapter, via_merged, atol=1e-4)
    assert not torch.allclose(plain, via_merged, atol=1e-3)


@pytest.mark.integration
def test_assistant_eval_reports_answers_of_every_system_and_reuses_the_builds_answers(tiny_bundle):
    from builder.eval_report import run_eval
    from core.bundle import Bundle

    bundle = Bundle.load(tiny_bundle)
    cached = json.loads((tiny_bundle / evaluate_answers.ANSWERS_FILE).read_text())
    report = run_eval(tiny_bundle)
    answers = report["answers"]
    assert answers.get("cached") == evaluate_answers.ANSWERS_FILE
    assert answers["base"] == cached["report"]["base"]
    fresh = evaluate_answers.answer_report(bundle, evaluate_answers.select_questions(
        [json.loads(line) for line in (tiny_bundle / "eval" / "heldout.jsonl").open()], 3))
    assert "cached" not in fresh
    systems = {"base_no_retrieval", "base"} | ({"finetuned"} if bundle.adapter_path() else set())
    assert systems <= set(fresh)
    for s in systems:
        assert fresh[s]["questions"] == 3.0 and 0.0 <= fresh[s]["f1"] <= 1.0 and fresh[s]["tokens_per_s"] > 0
    assert 0.0 <= fresh["base"]["refusal_unanswerable"] <= 1.0 and "citation_served" in fresh["base"]
    assert fresh["examples"] and fresh["examples"][0]["gold"]


def test_citations_count_at_chunk_level_beside_the_baselines_that_need_no_model():
    same_doc = {"text": "Maize > Spacing\nPlant 75 cm between rows.", "source": "crops/maize.md", "chunk_id": "m1"}
    gold = dict(GOLD, chunk_id="m2")
    contexts = [[same_doc, gold]]
    # The right document but the wrong passage: a document-level check would have passed it.
    m = evaluate_answers.score(["50 kg of DAP per acre [1]"], [Q], contexts, None, [{"m2"}])
    assert m["citation_chunk_model"] == 0.0
    assert evaluate_answers.score(["It is 50 kg [2]"], [Q], contexts, None, [{"m2"}])["citation_chunk_model"] == 1.0
    base = evaluate_answers.citation_baselines([Q], contexts, [{"m2"}])
    assert base["always_first"]["citation_chunk_model"] == 0.0  # passage [1] does not answer
    assert base["top_passage"]["citation_chunk_model"] == 1.0  # the passage sharing "DAP", "acre", "planting"
