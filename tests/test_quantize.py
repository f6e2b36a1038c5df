"""Int8 (W8A8) weights for vLLM on the CPU: what is quantized, how exactly, and that real vLLM serves them.

    .venv/bin/python -m pytest tests/test_quantize.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from builder.quantize import PROJECTIONS, QUANT_CONFIG, quantize_checkpoint, quantize_rows

KNOWLEDGE = Path(__file__).resolve().parent.parent / "knowledge"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from core.models import build_tiny_llama

    texts = [p.read_text(errors="replace") for p in sorted(KNOWLEDGE.rglob("*.md"))[:10]]
    return build_tiny_llama(texts, tmp_path_factory.mktemp("llama") / "model")


def test_rows_keep_one_scale_each_and_round_to_the_nearest_step():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5]).unsqueeze(1)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.all(q.abs().amax(dim=1) == 127)  # each row's largest weight uses the full range
    err = (q.float() * scale - w).abs()
    assert torch.all(err <= scale / 2 + 1e-7)  # at most half a step off, per row's own step
    zero_q, zero_scale = quantize_rows(torch.zeros(2, 3))
    assert torch.all(zero_q == 0) and torch.all(zero_scale > 0)  # no division by zero


def test_checkpoint_quantizes_the_decoder_projections_and_nothing_else(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    out = quantize_checkpoint(tiny_llama, tmp_path / "w8a8")
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    projections = [k for k in before if k.split(".")[-2] in PROJECTIONS]
    assert len(projections) == 2 * len(PROJECTIONS)  # 2 layers
    for k in projections:
        assert after[k].dtype == torch.int8 and after[k + "_scale"].shape == (before[k].shape[0], 1)
        restored = after[k].float() * after[k + "_scale"]
        assert torch.allclose(restored, before[k], atol=float(after[k + "_scale"].max()) / 2 + 1e-7)
    for k in set(before) - set(projections):  # embeddings, norms, lm_head
        assert after[k].dtype == torch.bfloat16
        assert torch.allclose(after[k].float(), before[k], rtol=1e-2, atol=1e-3)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == QUANT_CONFIG and config["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and not (tmp_path / "w8a8.tmp").exists()


def test_a_folder_without_weights_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


@pytest.mark.integration
def test_vllm_generates_from_the_int8_checkpoint(tiny_llama, tmp_path):
    """vLLM's compressed-tensors loader takes the checkpoint (int8 tensors could not load into float layers, so
    an answer means the int8 kernels ran)."""
    pytest.importorskip("vllm")
    from core.config import load_config
    from core.vllm_engine import generate_offline

    out = quantize_checkpoint(tiny_llama, tmp_path / "w8a8")
    convs = [[{"role": "user", "content": "When should maize be planted?"}],
             [{"role": "user", "content": "How much does DAP fertilizer cost?"}]]
    res = generate_offline(str(out), {"q": convs}, max_new_tokens=8, max_model_len=512,
                        serve_cfg=load_config("tiny").serve, timeout=600)
    assert len(res["q"]["texts"]) == 2 and res["q"]["tokens"] > 0
