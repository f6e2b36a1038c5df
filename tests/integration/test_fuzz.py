"""Bounded fuzzing (hypothesis): the ingestion parsers and the gateway's request handling take any input
without crashing, and the gateway never answers 500.

    .venv/bin/python -m pytest -m integration tests/integration/test_fuzz.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.ingest import IngestError, ingest_file
from core.config import IngestConfig

pytestmark = pytest.mark.integration

TEXT_FORMATS = ("guide.md", "page.html", "table.csv", "faq.qa.jsonl", "notes.txt")
# Text that looks like each format, so the parsers' inner branches run, not only their early exits.
MARKUPISH = st.text(alphabet=st.sampled_from(list("#*-|<>/=\"',:;{}[]\n\t abcXYZ019é\u200b\x00")), max_size=400)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(TEXT_FORMATS), body=st.one_of(MARKUPISH, st.text(max_size=300)),
       raw=st.binary(max_size=64))
def test_text_parsers_take_any_input_and_fail_only_with_an_ingest_error(name, body, raw):
    data = body.encode("utf-8", "surrogatepass") + raw
    try:
        doc, pairs = ingest_file(Path(name), name, data, IngestConfig(min_chars=0), lambda *_: None)
    except IngestError:
        return
    assert doc.source == name and isinstance(pairs, list)
    assert all(isinstance(b.text, str) for b in doc.blocks)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(("paper.pdf", "memo.docx")), tail=st.binary(max_size=200))
def test_pdf_and_docx_of_any_bytes_are_an_error_entry_never_a_crash(tmp_path_factory, name, tail):
    from builder.ingest import run

    folder = tmp_path_factory.mktemp("fuzz")
    head = b"%PDF-1.4\n" if name.endswith(".pdf") else b"PK\x03\x04"
    (folder / name).write_bytes(head + tail)
    (folder / "ok.md").write_text("# Fine\n\nSorghum tolerates drought better than maize does.\n")
    result = run(IngestConfig(), folder, log=lambda *_: None)
    assert [d.source for d in result.documents] == ["ok.md"]  # the good file is not lost
    assert all(e["path"] == name for e in result.errors)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                 max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "", "x"]),
                                 "content": st.one_of(st.text(max_size=80), st.none(), JSON)})
REQUEST = st.one_of(
    JSON,
    st.fixed_dictionaries({"model": st.one_of(st.just("assistant"), st.text(max_size=12)),
                           "messages": st.one_of(st.lists(MESSAGE, max_size=4), JSON)},
                          optional={"stream": st.booleans(), "max_tokens": st.one_of(st.integers(), JSON),
                                    "temperature": st.one_of(st.floats(allow_nan=False), JSON),
                                    "passages": st.one_of(st.integers(-3, 30), JSON), "n": st.integers(-1, 3),
                                    "stop": JSON, "stream_options": JSON}))


@pytest.fixture(scope="module")
def http(tiny_bundle):
    from fastapi.testclient import TestClient

    from serving.api import create_app
    from serving.rag_service import RagService
    from serving.settings import GatewaySettings, ServedModel
    from tests.fake_upstream import ThreadedServer, make_app

    with ThreadedServer(make_app(["assistant-ft"], api_key="up")) as upstream:
        settings = GatewaySettings(models=[ServedModel("assistant", tiny_bundle, "assistant-ft", "adapter")],
                                   vllm_base_url=f"{upstream.url}/v1", vllm_api_key="up", api_key="k", ui=False)
        with TestClient(create_app(settings, RagService.from_settings(settings)), raise_server_exceptions=False) as c:
            yield c


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=REQUEST)
def test_no_request_body_makes_the_gateway_answer_500(http, body):
    r = http.post("/v1/chat/completions", headers={"Authorization": "Bearer k"}, content=json.dumps(body))
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
