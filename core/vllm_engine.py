"""How this project runs vLLM: the offline engine the evaluation generates with, and the command line of the
OpenAI-compatible server that serving supervises (serving/vllm_server.py). Both share the CPU settings and the
LoRA rank rule, so evaluation runs vLLM the way serving does.

`plan_vllm` decides what the server serves and with which arguments: the bundle's merged weights (int8 on a
CPU where the bundle has them), or the base model with its LoRA adapter, or the base model alone.

    python -m core.vllm_engine --generate job.json   # the offline engine's child process (internal)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.bundle import TOKENIZER_FILES, Bundle
from core.config import ServeConfig, tristate

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


class VLLMError(RuntimeError):
    """vLLM could not be started, or stopped on its own; the message says why and where the log is."""


@dataclass
class VLLMPlan:
    """What vLLM will serve and the command that starts it."""

    argv: list[str]
    env: dict[str, str]
    served_name: str  # the fine-tuned model's name on vLLM (clients ask for this)
    weights: str  # 'merged', 'adapter' or 'base'
    reason: str  # why these weights, in words
    model_names: list[str] = field(default_factory=list)  # every name vLLM will list


def choose_weights(bundle: Bundle, device: str) -> tuple[str, str]:
    """('merged-w8a8' | 'merged' | 'adapter' | 'base', reason) following serve.use_merged, then serve.quantize.

    'auto' serves merged weights on the CPU, where vLLM's LoRA path costs 3.4x-11x in throughput, and the
    adapter on a GPU, where they are cheap and the base stays shareable between bundles. Merged weights on the
    CPU are the bundle's int8 copy where it has one (see int8_weights)."""
    weights, reason = _float_weights(bundle, device)
    if weights == "merged" and int8_weights(bundle, device):
        return "merged-w8a8", reason + "; int8 (W8A8) on the CPU, serve.quantize"
    return weights, reason


def _float_weights(bundle: Bundle, device: str) -> tuple[str, str]:
    adapter, merged = bundle.adapter_path(), bundle.merged_path()
    choice = tristate(bundle.config.serve.use_merged, "serve.use_merged")
    if not adapter and not merged:
        return "base", "the bundle has no fine-tuned weights (no adapter shipped), so the base model is served"
    if choice == "yes":
        if merged:
            return "merged", "serve.use_merged=yes"
        return "adapter", "serve.use_merged=yes but the bundle has no merged weights; serving the adapter"
    if choice == "no":
        if adapter:
            return "adapter", "serve.use_merged=no"
        return "merged", "serve.use_merged=no but the bundle has no adapter; serving the merged weights"
    on_gpu = device.startswith("cuda")
    if on_gpu and adapter:
        return "adapter", "auto: on a GPU LoRA kernels are cheap, so base + adapter"
    if not on_gpu and merged:
        return "merged", "auto: on the CPU vLLM's LoRA path is several times slower, so merged weights"
    if adapter:
        return "adapter", "auto: no merged weights in the bundle, so base + adapter"
    return "merged", "auto: the bundle has merged weights only"


def int8_weights(bundle: Bundle, device: str) -> str | None:
    """The int8 copy of the merged weights, where vLLM should serve it: on the CPU (oneDNN int8 kernels) when
    the bundle has one and serve.quantize is not 'none'."""
    return bundle.merged_w8a8_path() if bundle.config.serve.serves_int8(device.startswith("cuda")) else None


def lora_rank(adapter_dir: str) -> int:
    """The --max-lora-rank vLLM needs for an adapter: its largest rank, rounded up to an allowed value."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    r = max([int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise VLLMError(f"LoRA rank {r} of {adapter_dir} is above vLLM's largest ({LORA_RANKS[-1]})")


def cpu_list(cpus: set[int] | list[int]) -> str:
    """'0-3,6' for {0, 1, 2, 3, 6}: the form VLLM_CPU_OMP_THREADS_BIND takes."""
    ids = sorted(cpus)
    parts, start = [], None
    for i, c in enumerate(ids):
        if start is None:
            start = c
        if i + 1 == len(ids) or ids[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(parts)


def cpu_env(kvcache_gib: int, environ: dict | None = None) -> dict[str, str]:
    """vLLM-CPU settings: KV-cache size, and OpenMP threads bound to every core we may use with none held
    back (vLLM's default pins one core and reserves another: 3.7x fewer tokens/s on a 2-core machine).
    Values already in the environment win."""
    environ = os.environ if environ is None else environ
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    wanted = {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
              "VLLM_CPU_OMP_THREADS_BIND": cpu_list(cores),
              "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return {k: environ.get(k, v) for k, v in wanted.items()}


def plan_vllm(bundle: Bundle, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              device: str = "cpu", extra_args: list[str] | None = None, python: str | None = None) -> VLLMPlan:
    """The vLLM command line and environment for a bundle on a device ('cuda...' or 'cpu')."""
    cfg = bundle.config.serve
    name = bundle.served_model_name
    weights, reason = choose_weights(bundle, device)
    base = bundle.base_model_path()
    argv = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host,
            "--port", str(port), "--max-model-len", str(cfg.max_model_len),
            "--disable-uvicorn-access-log"]
    names = [name]
    if weights.startswith("merged"):
        merged = bundle.merged_w8a8_path() if weights == "merged-w8a8" else bundle.merged_path()
        argv += ["--model", merged, "--served-model-name", name]
        if not any((Path(merged) / f).exists() for f in TOKENIZER_FILES):
            argv += ["--tokenizer", base]
    elif weights == "adapter":
        adapter = bundle.adapter_path()
        # The fine-tuned model keeps the bundle's name; the raw base is listed beside it for comparison.
        argv += ["--model", base, "--served-model-name", f"{name}-base", "--enable-lora",
                 "--lora-modules", f"{name}={adapter}", "--max-lora-rank", str(lora_rank(adapter)),
                 "--max-loras", "1"]
        names.append(f"{name}-base")
    else:
        argv += ["--model", base, "--served-model-name", name]
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if api_key:
        # vLLM reads its key from the environment too; a command line is readable by every local user (ps).
        # vLLM checks it on some route prefixes only; the guard (core/vllm_guard.py) checks it on all of them.
        env["VLLM_API_KEY"] = api_key
        argv += ["--middleware", "core.vllm_guard.RequireKey"]
    if device.startswith("cuda"):
        argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size),
                 "--data-parallel-size", str(cfg.data_parallel_size),
                 "--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    else:
        env.update(cpu_env(cfg.cpu_kvcache_gib))
        argv += ["--block-size", str(cfg.cpu_block_size)]
    argv += list(extra_args or [])
    return VLLMPlan(argv=argv, env=env, served_name=name, weights=weights, reason=reason, model_names=names)


# ----------------------------------------------------------------------------------------------- offline engine

def offline_env(serve_cfg: ServeConfig, cuda: bool = False) -> dict[str, str]:
    """Environment for the offline engine's child: the server's CPU settings (KV cache size, every core we may
    use bound to its workers) and, on the CPU, the engine core inside the child instead of a process of its own,
    which starts an engine in well under half the time on 2 cores."""
    env = dict(os.environ)
    env.update(cpu_env(serve_cfg.cpu_kvcache_gib))
    if not cuda:
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def generate_offline(model: str, batches: dict[str, list[list[dict]]], max_new_tokens: int, max_model_len: int,
                     serve_cfg: ServeConfig, adapter: str | None = None, timeout: float | None = None,
                     lora_batches: Sequence[str] | None = None, eager: bool | None = None) -> dict[str, dict]:
    """Greedy answers from vLLM's offline engine, run in a child process (vLLM spawns workers; keeping it out of
    this process keeps its start method, threads and memory out of ours). With ``adapter``, the batches named in
    ``lora_batches`` (all, when None) are answered through it. ``eager``: skip torch.compile (default: on the
    CPU). Returns {batch: {"texts", "tokens", "seconds"}}."""
    import torch

    if eager is None:
        eager = not torch.cuda.is_available()

    work = Path(tempfile.mkdtemp(prefix="answer-eval-"))
    try:
        job = {"model": str(model), "adapter": adapter, "batches": batches, "max_new_tokens": max_new_tokens,
               "lora_batches": list(batches) if lora_batches is None else list(lora_batches),
               "max_model_len": max_model_len, "lora_rank": lora_rank(adapter) if adapter else None,
               "gpu_memory_utilization": serve_cfg.gpu_memory_utilization,
               "cuda": torch.cuda.is_available(), "enforce_eager": eager,
               "block_size": None if torch.cuda.is_available() else serve_cfg.cpu_block_size}
        (work / "job.json").write_text(json.dumps(job))
        log = work / "vllm.log"
        env = offline_env(serve_cfg, cuda=torch.cuda.is_available())
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-m", "core.vllm_engine", "--generate", str(work / "job.json")],
                                  check=False, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout,
                                  cwd=str(Path(__file__).resolve().parent.parent))
        if proc.returncode != 0 or not (work / "out.json").is_file():
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vLLM generation failed (exit {proc.returncode}):\n{tail}")
        return json.loads((work / "out.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _offline_child(job_path: str) -> int:
    """Body of the child process: one engine, every batch, results next to the job file."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    kw = {"model": job["model"], "tokenizer": job["adapter"] or job["model"], "max_model_len": job["max_model_len"],
          "seed": 0, "enable_prefix_caching": True, "enforce_eager": bool(job.get("enforce_eager"))}
    if job["cuda"]:
        kw["gpu_memory_utilization"] = job["gpu_memory_utilization"]
    if job.get("block_size"):
        kw["block_size"] = job["block_size"]
    lora = None
    if job["adapter"]:
        from vllm.lora.request import LoRARequest

        kw.update(enable_lora=True, max_lora_rank=job["lora_rank"], max_loras=1)
        lora = LoRARequest("adapter", 1, job["adapter"])
    llm = LLM(**kw)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    out = {}
    # One call per group (with and without the adapter) rather than one per batch: the engine keeps every
    # prompt of the group in flight together, where batch after batch would drain to a few long answers at
    # the end of each. A batch's seconds are its group's, shared out by generated tokens.
    groups: dict[bool, list[str]] = {}
    for name in job["batches"]:
        groups.setdefault(name in job["lora_batches"], []).append(name)
    for with_lora, names in groups.items():
        convs = [c for n in names for c in job["batches"][n]]
        start = time.perf_counter()
        results = llm.chat(convs, params, use_tqdm=False, lora_request=lora if with_lora else None) if convs else []
        seconds = time.perf_counter() - start
        counts = [len(r.outputs[0].token_ids) for r in results]
        total, at = sum(counts) or 1, 0
        for n in names:
            mine = slice(at, at + len(job["batches"][n]))
            at = mine.stop
            tokens = sum(counts[mine])
            out[n] = {"texts": [r.outputs[0].text.strip() for r in results[mine]], "tokens": tokens,
                      "seconds": round(seconds * tokens / total, 2)}
    tmp = Path(job_path).with_name("out.json.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, Path(job_path).with_name("out.json"))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="The offline vLLM engine's child process (internal).")
    ap.add_argument("--generate", metavar="JOB.json", required=True, help="run one generation job")
    args = ap.parse_args(argv)
    return _offline_child(args.generate)


if __name__ == "__main__":
    sys.exit(main())
