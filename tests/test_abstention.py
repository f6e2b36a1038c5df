"""Abstention: the support features, the calibrated rule, and that the gateway and `assistant ask` apply it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builder import abstention
from core.abstention import FEATURES, AbstentionRule, SupportFeatures
from core.bundle import Bundle
from core.prompting import REFUSAL
from core.retrieval import Lookup, Retriever


def test_threshold_refuses_at_most_the_allowed_share_of_answerable_supports():
    supports = [float(x) for x in range(20)]  # 0 .. 19
    t = abstention.threshold_for(supports, 0.05)  # one of 20 may go
    assert sum(s < t for s in supports) == 1
    t = abstention.threshold_for(supports, 0.0)
    assert sum(s < t for s in supports) == 0 and t > -1
    assert sum(s < abstention.threshold_for(supports[:10], 0.05) for s in supports[:10]) == 0  # 0.5 rounds down


def test_logistic_fit_separates_what_is_separable_and_points_the_weights_the_right_way():
    rng = np.random.default_rng(0)
    good = rng.normal([0.7, 1.0, 0.9], 0.05, size=(40, 3))
    bad = rng.normal([0.3, 0.2, 0.2], 0.05, size=(40, 3))
    mean, scale, w, b = abstention.fit_logistic(np.vstack([good, bad]), np.r_[np.ones(40), np.zeros(40)])
    assert (w > 0).all()  # more support on every feature means more likely answerable
    z = lambda x: ((x - mean) / scale) @ w + b
    assert (z(good) > 0).all() and (z(bad) < 0).all()


def test_the_off_topic_halves_are_disjoint_and_cover_the_list():
    cal, test = abstention.off_topic("calibration"), abstention.off_topic("test")
    assert cal and test and not set(cal) & set(test)
    assert sorted(cal + test) == sorted(abstention.OFF_TOPIC)


def test_rule_round_trips_and_refuses_a_manifest_it_cannot_read():
    rule = AbstentionRule((0.5, 0.5, 0.5), (0.1, 0.2, 0.3), (1.0, 1.0, 1.0), 0.0, -1.0)
    assert AbstentionRule.from_dict(rule.to_dict()) == rule
    assert AbstentionRule.from_dict(None) is None and AbstentionRule.from_dict({}) is None
    with pytest.raises(ValueError, match="features"):
        AbstentionRule.from_dict(dict(rule.to_dict(), features=["dense_top", "magic", "coverage_top"]))
    with pytest.raises(ValueError, match="one positive-scaled entry per feature"):
        AbstentionRule.from_dict(dict(rule.to_dict(), scale=[0.1, 0.0, 0.3]))
    feats = {"dense_top": 0.5, "bm25_top": 0.5, "coverage_top": 0.5}
    assert rule.support(feats) == 0.0 and not rule.abstains(feats)
    assert rule.abstains({"dense_top": 0.3, "bm25_top": 0.3, "coverage_top": 0.3})


def test_coverage_is_low_for_a_question_about_words_no_chunk_holds(tiny_bundle):
    retriever = Retriever.load(tiny_bundle)
    feats = SupportFeatures(retriever)
    on = "How much DAP per acre at planting maize?"
    off = "Which quarterback threw the most touchdowns in 1994?"
    f_on, f_off = (feats(q, retriever.lookup([q], 3)[0]) for q in (on, off))
    assert set(f_on) == set(FEATURES)
    assert f_on["coverage_top"] > 0.5 > f_off["coverage_top"]
    assert f_on["bm25_top"] > f_off["bm25_top"]
    assert feats("the and of", Lookup([], 0.1, 0.0)) == {"dense_top": 0.1, "bm25_top": 0.0, "coverage_top": 0.0}


def test_left_out_retrieval_never_returns_a_chunk_of_the_answering_documents(tiny_bundle):
    from core.gold import GoldMatcher

    retriever = Retriever.load(tiny_bundle)
    q = {"question": "How much DAP per acre at planting maize?", "answer": "50 kg", "source": "crops/maize.md"}
    excluded = abstention.left_out_chunks(GoldMatcher(retriever.chunks), retriever.chunks, q)
    assert excluded and all(retriever.chunks[i].source != "crops/maize.md" or i in excluded
                            for i in range(len(retriever.chunks)))
    found = retriever.lookup([q["question"]], 3, exclude=[excluded])[0]
    assert found.ranked and not {i for i, _ in found.ranked} & excluded
    assert all(retriever.chunks[i].source != "crops/maize.md" for i, _ in found.ranked)


def test_the_build_calibrates_on_dev_and_records_the_rule_and_its_dev_figures(tiny_bundle):
    manifest = Bundle.load(tiny_bundle).manifest
    info = manifest["abstention"]
    assert manifest["metrics"]["selection"]["abstention"] == info["calibrated_on"] == "dev split"
    rule = AbstentionRule.from_dict(info["rule"])
    assert rule is not None and info["dev"]["answerable"] == manifest["data"]["dev_questions"]
    assert info["dev"]["false_refusal"] <= manifest["config"]["retrieval"]["abstain_max_false_refusal"]
    assert info["decision"].startswith("abstains below support")
    # The test report scores the unanswerable cases by kind, as served.
    answers = manifest["metrics"].get("answers", {})
    for system in ("base", "finetuned"):
        if system in answers:
            assert {"document_left_out", "off_topic"} <= set(answers[system]["refusal_by_kind"])


def test_too_few_dev_questions_calibrate_nothing_and_say_why(tiny_bundle):
    retriever = Retriever.load(tiny_bundle)
    info = abstention.calibrate(retriever, [{"question": "q?", "answer": "a"}] * 3, 0.05, "dev split")
    assert info["rule"] is None and "at least 8" in info["decision"]


def _always_abstain(bundle_dir):
    """Give a bundle copy a rule that abstains on everything (threshold above any support)."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    rule = dict(manifest["abstention"]["rule"], threshold=1e9)
    manifest["abstention"] = dict(manifest["abstention"], rule=rule)
    path.write_text(json.dumps(manifest))


def test_the_gateway_refuses_without_asking_the_model_where_the_rule_abstains(tiny_bundle_copy):
    import openai
    from fastapi.testclient import TestClient

    from serving.api import create_app
    from serving.rag_service import RagService
    from serving.settings import GatewaySettings, ServedModel
    from tests.fake_upstream import ThreadedServer, make_app

    _always_abstain(tiny_bundle_copy)
    app = make_app(["assistant-ft"], api_key="up")
    with ThreadedServer(app) as upstream:
        settings = GatewaySettings(models=[ServedModel("assistant", tiny_bundle_copy, "assistant-ft", "adapter")],
                                   vllm_base_url=f"{upstream.url}/v1", vllm_api_key="up", api_key="k")
        service = RagService.from_settings(settings)
        with TestClient(create_app(settings, service)) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
            messages = [{"role": "user", "content": "How much DAP per acre at planting maize?"}]
            resp = client.chat.completions.create(model="assistant", messages=messages)
            assert resp.choices[0].message.content == REFUSAL and resp.abstained is True
            assert resp.sources and not any(s["cited"] for s in resp.sources)
            chunks = list(client.chat.completions.create(model="assistant", messages=messages, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUSAL
            assert chunks[-1].abstained is True
        assert app.state.requests == []  # the model was never asked


def test_assistant_ask_applies_the_same_rule(tiny_bundle_copy):
    from serving.local_assistant import LocalAssistant

    _always_abstain(tiny_bundle_copy)
    out = LocalAssistant.load(tiny_bundle_copy).answer("How much DAP per acre at planting maize?")
    assert out["answer"] == REFUSAL and out["abstained"] is True and out["sources"]


def test_the_ui_shows_the_refusal_and_the_passages_it_judged_too_weak(tiny_bundle_copy):
    import asyncio

    from serving.rag_service import RagService
    from serving.settings import GatewaySettings, ServedModel
    from serving.ui import chat_handler

    _always_abstain(tiny_bundle_copy)
    # Nothing listens upstream: an abstaining answer never needs the model server.
    settings = GatewaySettings(models=[ServedModel("assistant", tiny_bundle_copy, "assistant-ft", "adapter")],
                               vllm_base_url="http://127.0.0.1:9/v1", api_key="k", connect_timeout_s=1.0)
    respond = chat_handler(RagService.from_settings(settings))

    async def last():
        out = None
        async for out in respond("How much DAP per acre at planting maize?", [], [], "assistant"):
            pass
        return out

    _, chat, _, _, banner = asyncio.run(last())
    assert chat[-2]["content"] == REFUSAL and banner == ""
    assert chat[-1]["metadata"]["title"].startswith("Closest passages, none of which answers")
