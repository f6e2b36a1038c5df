"""The launcher's supervision of vLLM, with a stand-in for vLLM (tests/fake_upstream.py) so it runs in seconds:
SIGTERM stops both servers, and a vLLM that dies takes the launcher down with a message saying so.

    .venv/bin/python -m pytest -m integration tests/integration/test_launcher.py -q
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.fake_upstream import free_port
from tests.processes import pid_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fake_upstream.py"

# Runs `serve()` with plan_vllm's command swapped for the stand-in; everything else is the real launcher.
WRAPPER = textwrap.dedent("""
    import sys
    import serving.launcher as launcher

    bundle, port, vllm_port, fake, exit_after = sys.argv[1:6]
    max_restarts, token_delay = int(sys.argv[7]), sys.argv[8]
    real_plan = launcher.plan_vllm

    def plan_with_stand_in(b, **kw):
        plan = real_plan(b, **kw)
        plan.argv = [sys.executable, fake, "--port", str(kw["port"]), "--model", plan.served_name,
                     "--api-key", kw["api_key"], "--token-delay", token_delay] + (
                        ["--exit-after", exit_after] if exit_after != "-" else [])
        return plan

    launcher.plan_vllm = plan_with_stand_in
    sys.exit(launcher.serve(bundle, port=int(port), vllm_port=int(vllm_port), api_key="k",
                   vllm_log=sys.argv[6], ready_timeout=120, max_restarts=max_restarts))
""")


def start(tiny_bundle, tmp_path, exit_after: str = "-", max_restarts: int = 3, token_delay: float = 0.0):
    port, vllm_port = free_port(), free_port()
    script = tmp_path / "serve_with_stand_in.py"
    script.write_text(WRAPPER)
    with open(tmp_path / "launcher.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(tiny_bundle), str(port), str(vllm_port),
                                 str(FAKE), exit_after, str(tmp_path / "vllm.log"), str(max_restarts),
                                 str(token_delay)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, port, vllm_port, tmp_path / "launcher.log"


def wait_ready(proc, port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"launcher exited early ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=3) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"launcher not ready in {timeout} s:\n{log.read_text()[-2000:]}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_the_gateway_and_vllm(tiny_bundle, tmp_path):
    proc, port, vllm_port, log = start(tiny_bundle, tmp_path)
    try:
        wait_ready(proc, port, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        resp = client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "Striga?"}])
        assert resp.choices[0].message.content.startswith(f"According to {resp.sources[0]['source']}")
        assert f"http://127.0.0.1:{vllm_port}/v1" in log.read_text()  # the raw vLLM URL is printed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "vLLM stopped" in log.read_text()
    assert not port_open(vllm_port) and not port_open(port)


def test_launcher_exits_with_vllms_last_words_when_vllm_dies(tiny_bundle, tmp_path):
    proc, port, _vllm_port, log = start(tiny_bundle, tmp_path, exit_after="25", max_restarts=0)
    try:
        code = proc.wait(240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the launcher kept running after vLLM died:\n{log.read_text()[-2000:]}")
    text = log.read_text()
    assert code == 1, text[-2000:]
    assert "vLLM exited (code 3)" in text and "simulated crash" in text  # the end of vLLM's log is shown
    assert str(tmp_path / "vllm.log") in text
    assert not port_open(port)


def test_vllm_listens_on_loopback_even_when_the_gateway_serves_every_address(tiny_bundle, tmp_path):
    from serving import launcher

    seen = {}
    real_plan = launcher.plan_vllm

    def spy(b, **kw):
        seen.update(kw)
        raise launcher.VLLMError("stop here: only the plan's host is under test")

    launcher.plan_vllm = spy
    try:
        code = launcher.serve(tiny_bundle, host="0.0.0.0", port=free_port(), vllm_port=free_port(), api_key="k",
                              vllm_log=tmp_path / "vllm.log", ready_timeout=5)
    finally:
        launcher.plan_vllm = real_plan
    assert code == 1 and seen["host"] == "127.0.0.1"


def _pid_serving(port: int) -> int:
    """The stand-in vLLM itself (`python fake_upstream.py --port PORT ...`), not the launcher whose own command
    line names the script and the port too."""
    return pid_of(lambda argv: len(argv) > 3 and argv[1].endswith(b"fake_upstream.py")
                  and argv[2:4] == [b"--port", str(port).encode()], f"stand-in vLLM on port {port}")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_vllm_killed_mid_stream_gives_a_clean_error_then_is_restarted_and_answers_again(tiny_bundle, tmp_path):
    proc, port, vllm_port, log = start(tiny_bundle, tmp_path, token_delay=0.3)
    try:
        wait_ready(proc, port, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "How much DAP per acre at planting maize?"}]
        stream = iter(client.chat.completions.create(model="assistant", messages=messages, stream=True,
                                                     extra_body={"passages": 1}))
        next(stream)
        os.kill(_pid_serving(vllm_port), signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(openai.APIError, match="model server"):
            for _ in stream:
                pass
        while _ready(port):  # /ready turns false within 5 s
            assert time.monotonic() - killed < 5, "still ready 5 s after vLLM died"
            time.sleep(0.2)
        wait_ready(proc, port, log, timeout=60)  # restarted without a manual step
        again = client.chat.completions.create(model="assistant", messages=messages, extra_body={"passages": 1})
        assert again.choices[0].message.content
        assert proc.poll() is None and "restarting vLLM" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
