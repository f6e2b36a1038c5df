"""One `assistant serve` (real vLLM, base + LoRA adapter, gateway, UI) per test session, shared by the tests.

    .venv/bin/python -m pytest -m integration tests/integration/test_serving.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.bundle import Bundle
from tests.fake_upstream import free_port

REPO = Path(__file__).resolve().parents[2]
API_KEY = "integration-key"


def add_random_adapter(bundle_dir: Path, seed: int = 0) -> Path:
    """Give a tiny bundle a LoRA adapter with random (non-zero) weights, so it changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bundle = Bundle.load(bundle_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(bundle.base_model_path())
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = bundle_dir / "llm" / "adapter"
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle served as base + LoRA adapter. The adapter is random rather than the builder's: a few
    training steps barely move a tiny model, and the tests must see that vLLM applies the adapter."""
    dst = tmp_path_factory.mktemp("served") / tiny_bundle.name
    shutil.copytree(tiny_bundle, dst)
    for sub in ("adapter", "merged", "merged-w8a8"):
        shutil.rmtree(dst / "llm" / sub, ignore_errors=True)
    add_random_adapter(dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["models"]["llm"].update({"adapter": "llm/adapter", "merged": None, "merged_w8a8": None})
    manifest["config"]["serve"]["use_merged"] = "no"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@dataclass
class Served:
    proc: subprocess.Popen
    gateway: str  # http://127.0.0.1:PORT
    vllm: str
    api_key: str
    bundle: Path
    output: Path  # the launcher's stdout and stderr
    vllm_log: Path

    @property
    def gateway_v1(self) -> str:
        return f"{self.gateway}/v1"

    @property
    def vllm_v1(self) -> str:
        return f"{self.vllm}/v1"


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture(scope="session")
def served(adapter_bundle, output_dir) -> Served:
    port, vllm_port = free_port(), free_port()
    out_path, vllm_log = output_dir / "serve-launcher.log", output_dir / "serve-vllm.log"
    for p in (out_path, vllm_log):
        p.unlink(missing_ok=True)
    key_file = output_dir / "serve-api-key"
    key_file.write_text(API_KEY + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "assistant", "serve", str(adapter_bundle), "--port", str(port),
           "--vllm-port", str(vllm_port), "--api-key-file", str(key_file), "--vllm-log", str(vllm_log)]
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    s = Served(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vllm_port}", API_KEY, adapter_bundle,
               out_path, vllm_log)
    deadline = time.monotonic() + 900
    try:
        while http_status(f"{s.gateway}/ready") != 200:
            if proc.poll() is not None:
                pytest.fail(f"`assistant serve` exited with {proc.returncode}:\n{out_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"`assistant serve` was not ready in 900 s:\n{out_path.read_text()[-3000:]}")
            time.sleep(2)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
