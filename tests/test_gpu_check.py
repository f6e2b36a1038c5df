"""The GPU check script runs rarely (on the days a device is lent), so its small mode runs here on the CPU to
keep it from rotting between those days: every check completes and reports sane numbers."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_small_mode_runs_every_check(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "check_gpu.py"), "--small",
                           "--faiss-n", "3000", "--faiss-q", "200", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["small"] is True and res["device"] in ("cpu", "cuda", "cuda:0")

    lora = res["lora"]
    assert lora["steps"] == 3 and lora["tokens_per_s"] > 0
    assert 0 < lora["lora_params_m"] < lora["params_m"]  # only the adapter trains
    first, last = lora["loss_first_last"]
    assert math.isfinite(first) and math.isfinite(last)

    emb = res["embedder"]
    assert emb["steps"] == 3 and emb["pairs_per_s"] > 0 and emb["encode_per_s"] > 0

    faiss = res["faiss"]
    assert faiss["vectors"] == 3000 and faiss["queries"] == 200
    assert faiss["self_recall@1"] >= 0.99  # each query is a slightly perturbed indexed vector
