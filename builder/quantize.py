"""Int8 weights for serving on a CPU: W8A8 in the compressed-tensors format vLLM loads.

On a 2-core CPU a RAG answer's cost is mostly prefill (the prompt carries the retrieved passages), and prefill
is bound by matrix multiplies. vLLM's CPU build runs int8 x int8 matrix multiplies through oneDNN (VNNI on
x86), which do twice the multiply-adds per cycle of bf16. This module writes the merged fine-tuned model with:

- every linear layer of the decoder blocks as int8 weights, symmetric, one scale per output channel
  (scale = max |w| / 127 over the row), stored beside it as ``<name>.weight_scale``;
- activations quantized by vLLM at run time, one scale per token (dynamic, symmetric), so no calibration
  data is needed;
- embeddings, norms and the (tied) output head left in their float dtype.

    python -m builder.quantize bundles/latest/llm/merged /tmp/merged-w8a8
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

QUANT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                        "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}
# The decoder blocks' projections; what a Llama-style model keeps in float is everything else.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale of shape [rows, 1]) with w ~= q * scale, one scale per output row."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def is_projection(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTIONS


def quantize_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `src` (a Hugging Face causal-LM folder in safetensors) as a W8A8 int8 checkpoint in `dst`;
    the layers left in float are stored as `dtype`. Returns dst."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {src}")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_quantized = 0
    weight_map: dict[str, str] = {}
    for f in files:
        out: dict[str, torch.Tensor] = {}
        for name, t in load_file(str(f)).items():
            if is_projection(name):
                out[name], out[name + "_scale"] = quantize_rows(t)
                n_quantized += 1
            else:
                out[name] = t.to(dtype) if t.is_floating_point() else t
        save_file(out, str(tmp / f.name), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
    if n_quantized == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"no decoder projection weights ({', '.join(PROJECTIONS)}) found in {src}")
    if len(files) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",
                                                                                  "model.safetensors.index.json"):
            shutil.copy2(f, tmp / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m builder.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a merged model folder (config.json + *.safetensors)")
    p.add_argument("dst", help="where to write the int8 model (replaced if it exists)")
    args = p.parse_args(argv)
    print(quantize_checkpoint(args.src, args.dst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
