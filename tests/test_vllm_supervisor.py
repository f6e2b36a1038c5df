"""What vLLM is asked to serve, and how its process is supervised (no real vLLM: a stand-in process).

    .venv/bin/python -m pytest tests/test_vllm_supervisor.py -q
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from core.bundle import Bundle
from core.vllm_engine import VLLMError, choose_weights, cpu_env, cpu_list, lora_rank, plan_vllm
from serving.vllm_server import VLLMServer
from tests.fake_upstream import free_port

FAKE_UPSTREAM = Path(__file__).parent / "fake_upstream.py"


def make_bundle(root: Path, adapter_rank: int | None = None, merged: bool = False, merged_tokenizer: bool = True,
                int8: bool = False, **serve) -> Bundle:
    """A bundle folder with just what serving reads about the LLM."""
    (root / "llm" / "base").mkdir(parents=True)
    llm = {"base": {"name": "tiny", "path": "llm/base"}, "adapter": None, "merged": None}
    if adapter_rank:
        (root / "llm" / "adapter").mkdir()
        (root / "llm" / "adapter" / "adapter_config.json").write_text(json.dumps({"r": adapter_rank}))
        llm["adapter"] = "llm/adapter"
    if merged:
        (root / "llm" / "merged").mkdir()
        (root / "llm" / "merged" / "config.json").write_text("{}")
        if merged_tokenizer:
            (root / "llm" / "merged" / "tokenizer.json").write_text("{}")
        llm["merged"] = "llm/merged"
    if int8:
        (root / "llm" / "merged-w8a8").mkdir()
        (root / "llm" / "merged-w8a8" / "tokenizer.json").write_text("{}")
        llm["merged_w8a8"] = "llm/merged-w8a8"
    cfg = {"served_model_name": "agro", "use_merged": "auto", "tensor_parallel_size": 2, "data_parallel_size": 3,
           "max_model_len": 1024, "gpu_memory_utilization": 0.5, "cpu_kvcache_gib": 3, **serve}
    (root / "manifest.json").write_text(json.dumps({"bundle_id": "b1", "config": {"serve": cfg},
                                                    "models": {"llm": llm}}))
    return Bundle.load(root)


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_base_only_bundle_serves_the_base_under_the_bundle_name(tmp_path):
    plan = plan_vllm(make_bundle(tmp_path), port=8123, api_key="k", device="cpu")
    assert plan.weights == "base" and plan.served_name == "agro"
    assert arg(plan.argv, "--model") == str(tmp_path / "llm" / "base")
    assert arg(plan.argv, "--served-model-name") == "agro"
    # The key travels in the environment, never on the command line (which `ps` shows to every local user).
    assert "--api-key" not in plan.argv and "k" not in plan.argv and plan.env["VLLM_API_KEY"] == "k"
    assert arg(plan.argv, "--middleware") == "core.vllm_guard.RequireKey"  # every route, not vLLM's prefixes
    assert arg(plan.argv, "--port") == "8123"
    assert arg(plan.argv, "--max-model-len") == "1024"
    assert "--enable-lora" not in plan.argv


def test_adapter_is_served_under_the_bundle_name_next_to_the_base(tmp_path):
    plan = plan_vllm(make_bundle(tmp_path, adapter_rank=12), device="cpu")
    assert plan.weights == "adapter"
    assert arg(plan.argv, "--model") == str(tmp_path / "llm" / "base")
    assert arg(plan.argv, "--served-model-name") == "agro-base"
    assert "--enable-lora" in plan.argv
    assert arg(plan.argv, "--lora-modules") == f"agro={tmp_path / 'llm' / 'adapter'}"
    assert arg(plan.argv, "--max-lora-rank") == "16"  # rank 12 rounded up to a value vLLM accepts
    assert plan.model_names == ["agro", "agro-base"]
    assert "--api-key" not in plan.argv and "VLLM_API_KEY" not in plan.env


@pytest.mark.parametrize("device,use_merged,expected", [
    ("cpu", "auto", "merged"),  # LoRA kernels are slow on the CPU
    ("cuda", "auto", "adapter"),  # and cheap on a GPU
    ("cpu", "no", "adapter"),
    ("cuda", "yes", "merged"),
])
def test_merged_or_adapter_follows_use_merged_and_the_device(tmp_path, device, use_merged, expected):
    bundle = make_bundle(tmp_path, adapter_rank=8, merged=True, use_merged=use_merged)
    plan = plan_vllm(bundle, device=device)
    assert plan.weights == expected
    if expected == "merged":
        assert arg(plan.argv, "--model") == str(tmp_path / "llm" / "merged")
        assert arg(plan.argv, "--served-model-name") == "agro" and "--enable-lora" not in plan.argv
    else:
        assert "--enable-lora" in plan.argv


@pytest.mark.parametrize("device,quantize,model", [
    ("cpu", "auto", "merged-w8a8"),  # oneDNN int8 kernels: the CPU's fastest prefill
    ("cpu", "w8a8", "merged-w8a8"),
    ("cpu", "none", "merged"),
    ("cuda", "auto", "merged"),  # a GPU serves the float weights it was given
])
def test_int8_weights_are_served_on_the_cpu_unless_quantize_is_none(tmp_path, device, quantize, model):
    bundle = make_bundle(tmp_path, adapter_rank=8, merged=True, int8=True, use_merged="yes", quantize=quantize)
    plan = plan_vllm(bundle, device=device)
    assert arg(plan.argv, "--model") == str(tmp_path / "llm" / model)
    assert plan.weights == model and arg(plan.argv, "--served-model-name") == "agro"
    assert choose_weights(bundle, device)[0] == model  # what GatewaySettings.from_env reports too
    if model == "merged-w8a8":
        assert "int8" in plan.reason


def test_cpu_kv_blocks_are_small_enough_to_cache_the_shared_system_prompt(tmp_path):
    assert arg(plan_vllm(make_bundle(tmp_path / "a"), device="cpu").argv, "--block-size") == "32"
    assert arg(plan_vllm(make_bundle(tmp_path / "b", cpu_block_size=64), device="cpu").argv, "--block-size") == "64"
    assert "--block-size" not in plan_vllm(make_bundle(tmp_path / "c"), device="cuda").argv


def test_missing_weights_fall_back_to_what_the_bundle_has(tmp_path):
    only_adapter = make_bundle(tmp_path / "a", adapter_rank=8, use_merged="yes")
    assert plan_vllm(only_adapter, device="cpu").weights == "adapter"
    only_merged = make_bundle(tmp_path / "m", merged=True, use_merged="no")
    assert plan_vllm(only_merged, device="cuda").weights == "merged"


def test_merged_weights_without_a_tokenizer_borrow_the_base_tokenizer(tmp_path):
    plan = plan_vllm(make_bundle(tmp_path, merged=True, merged_tokenizer=False), device="cpu")
    assert arg(plan.argv, "--tokenizer") == str(tmp_path / "llm" / "base")


def test_gpu_gets_parallelism_and_memory_share_cpu_gets_thread_binding(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path)
    gpu = plan_vllm(bundle, device="cuda")
    assert arg(gpu.argv, "--tensor-parallel-size") == "2" and arg(gpu.argv, "--data-parallel-size") == "3"
    assert arg(gpu.argv, "--gpu-memory-utilization") == "0.5"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in gpu.env
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cpu = plan_vllm(bundle, device="cpu", extra_args=["--dtype", "float32"])
    assert "--tensor-parallel-size" not in cpu.argv and cpu.argv[-2:] == ["--dtype", "float32"]
    assert cpu.env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert cpu.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert cpu.env["VLLM_CPU_OMP_THREADS_BIND"] == cpu_list(os.sched_getaffinity(0))


def test_thread_binding_from_the_environment_wins():
    env = cpu_env(1, {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "9"})
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "9", "VLLM_CPU_OMP_THREADS_BIND": "0",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_cpu_list_compacts_ranges():
    assert cpu_list({0, 1, 2, 3, 6}) == "0-3,6"
    assert cpu_list([5]) == "5"
    assert cpu_list([0, 2, 3]) == "0,2-3"


def test_lora_rank_takes_the_largest_rank_in_the_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 40}}))
    assert lora_rank(str(tmp_path)) == 64


def test_a_vllm_that_dies_while_starting_fails_with_its_log(tmp_path):
    script = "import sys; print('ValueError: not enough memory for the KV cache'); sys.exit(7)"
    server = VLLMServer([sys.executable, "-c", script], {}, tmp_path / "vllm.log", f"http://127.0.0.1:{free_port()}")
    server.start()
    with pytest.raises(VLLMError) as info:
        server.wait_ready(timeout=30, poll=0.1)
    message = str(info.value)
    assert "exited (code 7)" in message and "not enough memory for the KV cache" in message
    assert str(tmp_path / "vllm.log") in message


def test_stop_ends_the_whole_process_group(tmp_path):
    port = free_port()
    # The stand-in starts a grandchild, as vLLM starts its engine core; stop() must end both.
    script = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"import runpy; sys.argv = ['fake', '--port', '{port}']; runpy.run_path({str(FAKE_UPSTREAM)!r}, "
              f"run_name='__main__')")
    server = VLLMServer([sys.executable, "-c", script], {"PYTHONPATH": str(Path(__file__).parent.parent)},
                        tmp_path / "vllm.log", f"http://127.0.0.1:{port}")
    server.start()
    try:
        server.wait_ready(timeout=60, poll=0.2)
        assert server.healthy()
    finally:
        server.stop(timeout=10)
    assert not server.alive()
    assert _group_gone(server.pid)


def _group_gone(pgid: int, wait_s: float = 10.0) -> bool:
    """No live process is left in the group (zombies waiting for init to reap them do not count)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        alive = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    alive.append(pid)
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_the_vllm_guard_needs_the_key_on_every_route_but_health(monkeypatch):
    import asyncio

    from core.vllm_guard import RequireKey

    monkeypatch.setenv("VLLM_API_KEY", "k")
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequireKey(app)

    def status(path: str, auth: str | None = None) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        headers = [(b"authorization", auth.encode())] if auth else []
        asyncio.run(guard({"type": "http", "path": path, "method": "POST", "headers": headers}, None, send))
        return sent[0]["status"]

    for path in ("/invocations", "/tokenize", "/metrics", "/docs", "/v1/chat/completions"):
        assert status(path) == 401 and status(path, "Bearer wrong") == 401
        assert status(path, "Bearer k") == 200
    assert status("/health") == 200
    assert reached == ["/invocations", "/tokenize", "/metrics", "/docs", "/v1/chat/completions", "/health"]
