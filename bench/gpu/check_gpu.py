"""A short device check for the day a GPU is lent: LoRA training steps on a real model size in bf16, embedder
training steps, and a FAISS search, with throughput for each; prints a table and writes JSON.

    .venv/bin/python bench/gpu/check_gpu.py                    # on the GPU: ~1B Llama LoRA, MiniLM, 1M x 384 FAISS
    .venv/bin/python bench/gpu/check_gpu.py --small            # anywhere, in under a minute: tiny models, CPU is fine
    .venv/bin/python bench/gpu/check_gpu.py --llm smollm2 --steps 30 --seq-len 2048 --batch 16

The LLM's weights do not matter for speed, so ``--llm 1b`` / ``3b`` build a randomly initialised Llama of that
shape locally (no download); ``--llm smollm2`` uses the packaged SmolLM2-135M-Instruct; a folder path loads that
model. Device and dtype come from core.device (bf16 on a GPU that has it). The LoRA step is the one the build
runs: PEFT adapters on every projection, loss on the last ``--answer-tokens`` tokens only (logits computed for
those alone), AdamW; the first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHAPES = {  # hidden, layers, heads, kv heads, intermediate (Llama-style; head_dim = hidden / heads)
    "tiny": (128, 2, 2, 2, 256),
    "1b": (2048, 22, 32, 4, 5632),
    "3b": (3072, 28, 24, 8, 8192),
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(step, opt, device: str, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run ``warmup + steps`` optimizer steps of ``step()`` (which returns the loss); the seconds and losses of
    the timed ones (the device synchronized around each)."""
    times, losses = [], []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    return times, losses


def load_llm(name: str, dtype, device: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name in SHAPES:
        hidden, layers, heads, kv, inter = SHAPES[name]
        config = LlamaConfig(vocab_size=32000 if name != "tiny" else 2048, hidden_size=hidden,
                             intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv, max_position_embeddings=8192, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        return model
    from core.models import resolve_llm

    return AutoModelForCausalLM.from_pretrained(str(resolve_llm(name)), dtype=dtype).to(device)


def check_lora(args, device: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from builder.lora_trainer import masked_lm_loss
    from core.device import get_dtype

    dtype = get_dtype(device)
    t0 = time.perf_counter()
    model = load_llm(args.llm, dtype, device)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer_tokens:] = ids[:, -args.answer_tokens:]
    keep = args.answer_tokens + 1
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep)
        return masked_lm_loss(out, labels)

    times, losses = timed_steps(step, opt, device, args.warmup, args.steps)
    step_s = sum(times) / len(times)
    return {"model": args.llm, "params_m": round(n_params / 1e6, 1), "lora_params_m": round(trainable / 1e6, 2),
            "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "seq_len": args.seq_len,
            "steps": len(times), "step_s": round(step_s, 4), "tokens_per_s": round(args.batch * args.seq_len / step_s, 1),
            "load_s": round(load_s, 1), "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None}


def random_embedder(src: Path) -> Path:
    """A copy of a sentence-transformers folder with fresh random weights: same architecture and tokenizer, so
    the same speed, without carrying the weights to a bare GPU machine (MiniLM's are 91 MB)."""
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoModel

    dst = Path(tempfile.mkdtemp(prefix="check-emb-")) / "random"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    AutoModel.from_config(AutoConfig.from_pretrained(str(dst))).save_pretrained(str(dst))
    return dst


def check_embedder(args, device: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    made = None  # a temporary model folder of this check's own, removed when it is done
    if args.small:
        import tempfile

        from core.models import build_tiny_bert

        path = build_tiny_bert([f"passage {i} about soil and maize and rain" for i in range(200)],
                               Path(tempfile.mkdtemp(prefix="check-emb-")) / "tiny")
        made = Path(path).parent
    elif args.emb_shape:
        path = random_embedder(Path(args.emb_shape))
        made = path.parent
    else:
        from core.models import resolve_embedder

        path = resolve_embedder("minilm")
    model = SentenceTransformer(str(path), device=device)
    loss_fn = MultipleNegativesRankingLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    queries = [f"how much fertilizer does crop {i} need in season {i % 4}?" for i in range(args.emb_batch)]
    passages = [f"Crop {i} needs {i % 50 + 10} kg of fertilizer per acre in season {i % 4}, applied at planting "
                f"and again at knee height, according to the field handbook section {i}." for i in range(args.emb_batch)]
    use_amp = device.startswith("cuda")
    prep = getattr(model, "preprocess", None) or model.tokenize

    def step():
        features = [{k: v.to(device) if hasattr(v, "to") else v for k, v in prep(texts).items()}
                    for texts in (queries, passages)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            return loss_fn(features, None)

    times, _ = timed_steps(step, opt, device, args.warmup, args.emb_steps)
    step_s = sum(times) / len(times)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model.encode(passages * 4, batch_size=args.emb_batch, show_progress_bar=False)
        _sync(device)
        encode_s = time.perf_counter() - start
    if made is not None:
        import shutil

        shutil.rmtree(made, ignore_errors=True)
    return {"model": Path(str(path)).name, "batch": args.emb_batch, "steps": len(times), "step_s": round(step_s, 4),
            "pairs_per_s": round(args.emb_batch / step_s, 1), "encode_per_s": round(4 * len(passages) / encode_s, 1)}


def check_faiss(args) -> dict:
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.faiss_n, 384), dtype=np.float32)
    faiss.normalize_L2(base)
    chosen = rng.choice(args.faiss_n, args.faiss_q, replace=False)
    queries = base[chosen] + 0.01 * rng.standard_normal(
        (args.faiss_q, 384), dtype=np.float32)
    faiss.normalize_L2(queries)
    out = {"vectors": args.faiss_n, "queries": args.faiss_q, "gpus": faiss.get_num_gpus()}
    index = faiss.IndexFlatIP(384)
    start = time.perf_counter()
    index.add(base)
    out["add_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    _, ids = index.search(queries, 10)
    seconds = time.perf_counter() - start
    out["cpu_qps"] = round(args.faiss_q / seconds, 1)
    out["self_recall@1"] = round(float(np.mean(ids[:, 0] == chosen)), 3)  # each query is a perturbed base vector
    if faiss.get_num_gpus() > 0:
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        gpu_index.search(queries[:10], 10)
        start = time.perf_counter()
        gpu_index.search(queries, 10)
        out["gpu_qps"] = round(args.faiss_q / (time.perf_counter() - start), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", "--dry-run", action="store_true", dest="small",
                    help="tiny models and sizes: proves the script runs (CPU is fine), measures nothing useful")
    ap.add_argument("--llm", default=None, help="tiny, 1b, 3b, smollm2 or a model folder (default 1b; tiny with --small)")
    ap.add_argument("--steps", type=int, default=None, help="timed LoRA steps (default 10; 3 with --small)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=None, help="sequences per LoRA step (default 8; 2 with --small)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; 128 with --small)")
    ap.add_argument("--answer-tokens", type=int, default=64, help="labelled tokens at the end of each sequence")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    ap.add_argument("--emb-steps", type=int, default=None, help="timed embedder steps (default 20; 3 with --small)")
    ap.add_argument("--emb-shape", default=None, metavar="DIR",
                    help="sentence-transformers folder (config + tokenizer) to train with random weights")
    ap.add_argument("--emb-batch", type=int, default=None, help="pairs per embedder step (default 128; 16 with --small)")
    ap.add_argument("--faiss-n", type=int, default=None, help="vectors in the index (default 1,000,000; 20,000 small)")
    ap.add_argument("--faiss-q", type=int, default=1000, help="queries")
    ap.add_argument("--skip", action="append", default=[], choices=["lora", "embedder", "faiss"])
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/gpu_check[_small].json)")
    args = ap.parse_args(argv)
    small = args.small
    args.llm = args.llm or ("tiny" if small else "1b")
    args.steps = args.steps or (3 if small else 10)
    args.batch = args.batch or (2 if small else 8)
    args.seq_len = args.seq_len or (128 if small else 1024)
    args.answer_tokens = min(args.answer_tokens, args.seq_len - 1)
    args.emb_steps = args.emb_steps or (3 if small else 20)
    args.emb_batch = args.emb_batch or (16 if small else 128)
    args.faiss_n = args.faiss_n or (20_000 if small else 1_000_000)
    args.faiss_q = min(args.faiss_q, args.faiss_n)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from core.device import get_device, set_threads

    set_threads()
    device = get_device("auto")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    results: dict = {"device": device, "gpu": gpu, "torch": torch.__version__, "small": small,
                     "machine": f"{len(os.sched_getaffinity(0))} CPU cores, {platform.machine()}",
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = time.perf_counter()
    for name, fn in (("lora", lambda: check_lora(args, device)), ("embedder", lambda: check_embedder(args, device)),
                     ("faiss", lambda: check_faiss(args))):
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing check should not hide the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name:<9} {json.dumps(results[name])}", flush=True)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"gpu_check{'_small' if small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"device {device} ({gpu or 'no GPU'}); total {results['total_s']} s; written to {out}")
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
