"""`assistant serve` as its users meet it: the official openai client against the gateway and against vLLM,
and a real browser on the chat UI. vLLM starts once per session (see conftest.py).

    .venv/bin/python -m pytest -m integration tests/integration/test_serving.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import openai
import pytest

from core.bundle import INDEX_DIR
from core.retrieval import load_chunks
from serving.api import create_app
from serving.settings import GatewaySettings, ServedModel
from tests.fake_upstream import ThreadedServer, free_port
from tests.integration.conftest import http_status
from tests.processes import command_lines, pid_of

pytestmark = pytest.mark.integration

QUESTION = "How far should a water pan be from a pit latrine?"
ANSWER_TERM = "latrine"  # the answer's distinctive word; the test checks that one document alone holds it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def expected_document(served) -> str:
    chunks = load_chunks(served.bundle / INDEX_DIR)
    holders = {c.source for c in chunks if ANSWER_TERM in c.text.lower()}
    assert len(holders) == 1, f"precondition: exactly one document should mention {ANSWER_TERM!r}, got {holders}"
    return holders.pop()


@pytest.fixture(scope="module")
def gateway(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.gateway_v1, api_key=served.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vllm(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.vllm_v1, api_key=served.api_key, max_retries=0, timeout=120)


def test_gateway_lists_the_assistant(gateway, served):
    models = gateway.models.list().data
    assert [m.id for m in models] == ["assistant"]
    assert models[0].bundle_id == served.bundle.name and models[0].weights == "adapter"


def test_chat_completion_cites_the_only_document_holding_the_answer(gateway, expected_document):
    resp = gateway.chat.completions.create(model="assistant", messages=[{"role": "user", "content": QUESTION}])
    assert resp.object == "chat.completion"
    assert resp.sources[0]["source"] == expected_document
    assert ANSWER_TERM in resp.sources[0]["text"].lower()
    assert resp.usage.completion_tokens > 0 and resp.choices[0].message.content.strip()


def test_streamed_chat_completion_ends_with_its_sources(gateway, expected_document):
    chunks = list(gateway.chat.completions.create(model="assistant", stream=True,
                                                  messages=[{"role": "user", "content": QUESTION}]))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces).strip()
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.sources[0]["source"] == expected_document


def test_vllm_serves_the_adapter_to_the_openai_client_directly(vllm, served):
    models = {m.id: m for m in vllm.models.list().data}
    assert set(models) == {"assistant", "assistant-base"}
    assert models["assistant"].root == str(served.bundle / "llm" / "adapter")
    messages = [{"role": "user", "content": "When should maize be planted?"}]
    tuned = vllm.chat.completions.create(model="assistant", messages=messages, max_tokens=12, temperature=0)
    base = vllm.chat.completions.create(model="assistant-base", messages=messages, max_tokens=12, temperature=0)
    assert tuned.choices[0].message.content and tuned.usage.completion_tokens > 0
    assert tuned.choices[0].message.content != base.choices[0].message.content  # the adapter is applied
    assert not hasattr(tuned, "sources") or tuned.sources is None  # raw model: no retrieval


@pytest.mark.parametrize("server", ["gateway", "vllm"])
def test_requests_without_the_key_get_401(served, server):
    url = served.gateway_v1 if server == "gateway" else served.vllm_v1
    for key in ("wrong-key", "EMPTY"):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": QUESTION}])
        assert info.value.status_code == 401
    if server == "gateway":
        assert info.value.body["code"] == "invalid_api_key" and "message" in info.value.body


@pytest.mark.parametrize("method,path", [("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/metrics"),
                                         ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/models")])
def test_no_vllm_route_answers_without_the_key(served, method, path):
    import httpx

    body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    r = httpx.request(method, served.vllm + path, json=body if method == "POST" else None, timeout=30)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])
    ok = httpx.request(method, served.vllm + path, json=body if method == "POST" else None, timeout=60,
                       headers={"Authorization": f"Bearer {served.api_key}"})
    assert ok.status_code != 401
    assert httpx.get(served.vllm + "/health", timeout=30).status_code == 200  # the supervisor's check stays open


def test_the_key_is_on_no_command_line(served):
    lines = [b" ".join(argv).decode(errors="replace") for argv in command_lines().values()]
    ours = [c for c in lines if "vllm.entrypoints" in c or "assistant serve" in c or "-m assistant" in c]
    assert any("vllm.entrypoints" in c for c in ours)
    assert not any(served.api_key in c for c in ours)  # `ps` shows every user these


def test_unknown_model_gets_a_404_in_openai_error_format(gateway):
    with pytest.raises(openai.NotFoundError) as info:
        gateway.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    err = info.value.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "gpt-4o" in err["message"] and "assistant" in err["message"]


def test_ready_reports_the_model_server_and_the_index(served):
    import urllib.request

    with urllib.request.urlopen(f"{served.gateway}/ready", timeout=10) as r:
        body = json.loads(r.read())
    assert body["ready"] and body["model_server"]["ok"] and "assistant" in body["model_server"]["detail"]
    assert body["indexes"]["assistant"]["chunks"] > 0


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        # `make test` installs Debian's Chromium where it can; a skip is only for a run outside CI that asks.
        if os.environ.get("ASSISTANT_SKIP_BROWSER") == "1" and not os.environ.get("CI"):
            pytest.skip("no Chromium, and ASSISTANT_SKIP_BROWSER=1 asked to skip the browser tests")
        pytest.fail("no Chromium on this machine: the UI tests drive a real browser. Install Debian's "
                    "(apt-get install chromium; `make test` does it when run as root), or, outside CI only, "
                    "set ASSISTANT_SKIP_BROWSER=1 to skip these tests")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_chat_ui_streams_an_answer_and_shows_its_source(served, browser, expected_document, output_dir):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(served.gateway + "/")
    # With an API key the UI asks for it at a login form: any user name, the key as the password.
    page.get_by_label("username").fill("tester")
    page.get_by_label("password").fill(served.api_key)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#question textarea", timeout=60_000)
    assert served.bundle.name in page.inner_text("#header")
    assert "Example questions" in page.inner_text("body")
    # Record every text the answer bubble shows, to see it grow as tokens stream in.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const bots = document.querySelectorAll('#chat [data-testid="bot"]');
            if (bots.length) window.__seen.push(bots[0].innerText);
        }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#question textarea", QUESTION)
    page.click("#ask")
    page.wait_for_selector(f'#sources .source[data-source="{expected_document}"]', timeout=120_000)
    sources_title = page.locator("#chat").get_by_text("Sources:", exact=False).first
    sources_title.wait_for(timeout=120_000)
    answer = page.locator('#chat [data-testid="bot"]').first.inner_text().strip()
    assert answer and not answer.startswith("⚠️")
    assert expected_document in sources_title.inner_text()
    first_source = page.locator("#sources .source").first
    assert first_source.get_attribute("data-source") == expected_document
    assert ANSWER_TERM in first_source.inner_text().lower()  # the passage text is shown
    seen = [s.strip() for s in page.evaluate("window.__seen") if s.strip()]
    assert len(set(seen)) >= 2, f"the answer did not stream: {seen}"
    assert page.locator("#status .error").count() == 0
    page.screenshot(path=str(output_dir / "ui-answer.png"), full_page=True)
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length === 0")
    page.close()


def test_chat_ui_says_so_when_vllm_is_down(tiny_bundle, browser, output_dir):
    settings = GatewaySettings(models=[ServedModel("assistant", tiny_bundle, "assistant")],
                               vllm_base_url=f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=1.0)
    with ThreadedServer(create_app(settings)) as gateway:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(gateway.url + "/")
        page.wait_for_selector("#question textarea", timeout=60_000)
        page.fill("#question textarea", QUESTION)
        page.click("#ask")
        banner = page.locator("#status .error")
        banner.wait_for(timeout=60_000)
        assert "not reachable" in banner.inner_text()
        bubble = page.locator('#chat [data-testid="bot"]').first
        assert bubble.inner_text().strip().startswith("⚠️")
        # The request is over: no progress indicator is left spinning.
        page.wait_for_function("!document.querySelector('#chat .progress-text, #chat .eta-bar')", timeout=10_000)
        page.screenshot(path=str(output_dir / "ui-vllm-down.png"))
        page.close()


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


def _vllm_api_pid(port: str) -> int:
    """The pid of the real vLLM's API server process (`python -m vllm.entrypoints.openai.api_server ... --port P`)."""
    return pid_of(lambda argv: b"vllm.entrypoints.openai.api_server" in argv and port.encode() in argv,
                  f"vLLM API server on port {port}")


def test_a_killed_vllm_gives_a_clean_error_is_restarted_and_answers_again(served, gateway):
    """Second to last: the session's vLLM is killed here and must come back for the last test."""
    stream = iter(gateway.chat.completions.create(model="assistant", stream=True, max_tokens=64,
                                                  messages=[{"role": "user", "content": QUESTION}]))
    next(stream)
    os.kill(_vllm_api_pid(served.vllm.rsplit(":", 1)[1]), signal.SIGKILL)
    killed = time.monotonic()
    try:
        for _ in stream:
            pass
    except openai.APIError as exc:  # a clean error in OpenAI's shape, not a hang or a cut connection
        assert "model server" in str(exc)
    not_ready = None
    while time.monotonic() - killed < 5:
        if http_status(f"{served.gateway}/ready") == 503:
            not_ready = time.monotonic() - killed
            break
        time.sleep(0.2)
    assert not_ready is not None, "/ready still said ready 5 s after vLLM was killed"
    deadline = time.monotonic() + 600
    while http_status(f"{served.gateway}/ready") != 200:  # restarted by the launcher, no manual step
        assert served.proc.poll() is None, served.output.read_text()[-2000:]
        assert time.monotonic() < deadline, served.output.read_text()[-2000:]
        time.sleep(2)
    again = gateway.chat.completions.create(model="assistant", messages=[{"role": "user", "content": QUESTION}])
    assert again.choices[0].message.content.strip()
    assert "restarting vLLM" in served.output.read_text()


def test_sigterm_stops_vllm_and_the_gateway(served):
    """Runs last in this file: it ends the session's server."""
    served.proc.send_signal(signal.SIGTERM)
    try:
        code = served.proc.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher did not stop within 90 s of SIGTERM")
    output = served.output.read_text()
    assert code == 0, output[-2000:]
    assert "vLLM stopped" in output
    assert not _port_open(served.vllm) and not _port_open(served.gateway)
