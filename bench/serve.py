"""Serving speed: aggregate tokens/s at 1, 4 and 16 concurrent requests for the fine-tuned model through vLLM,
through the RAG gateway (retrieval included), and for naive batched HF generate; time to first token, the
gateway's added latency, and the retrieval step's time.

    .venv/bin/python bench/serve.py --bundle bundles/latest
    .venv/bin/python bench/serve.py --bundle bundles/latest --lora-comparison   # also adapter vs merged on vLLM

Every request asks for exactly --max-tokens new tokens (min_tokens = max_tokens, EOS ignored), so all three
engines generate the same amount. The prompts are the real RAG prompts (system prompt, retrieved passages,
question) for the bundle's held-out and example questions; vLLM-direct and gateway runs send the same prompts,
so vLLM's prefix cache is emptied before every measurement (VLLM_SERVER_DEV_MODE=1 enables that endpoint),
else the second of two runs would skip most of its prefill. `question_only` adds the raw model's throughput
at the highest concurrency with the bare question as prompt (how people query vLLM directly), for vLLM and
HF. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.bundle import CHUNKS_FILE, HELDOUT_FILE, INDEX_DIR, Bundle, read_chunks
from core.focus import bundle_focus
from core.prompting import build_messages
from core.retrieval import Retriever
from serving.rag_service import example_questions

KEY = "bench-key"
WARM_UP = [{"role": "user", "content": "Say hello."}]


def reset_prefix_cache(vllm_v1: str) -> None:
    """Empty vLLM's prefix cache so a measurement does not reuse an earlier one's prefill."""
    root = vllm_v1.removesuffix("/v1")
    req = urllib.request.Request(f"{root}/reset_prefix_cache", method="POST", data=b"",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def questions_for(bundle: Bundle, n: int) -> list[str]:
    """n questions to load the servers with: the bundle's test questions, the UI's example questions, and for a
    bundle with neither (a folder of plain text without question/answer files) one question per document."""
    qs = []
    heldout = bundle.file(HELDOUT_FILE)
    if heldout.is_file():
        qs = [json.loads(line)["question"] for line in heldout.read_text().splitlines() if line.strip()]
    qs += [q for q in example_questions(bundle, limit=n) if q not in qs]
    if not qs:
        chunks = read_chunks(bundle.file(INDEX_DIR) / CHUNKS_FILE)
        qs = list(dict.fromkeys(f"What does {c.title or c.source} say?" for c in chunks))
    if not qs:
        raise SystemExit(f"{bundle.path}: no questions to ask (no test split, no headings, no chunks)")
    return [qs[i % len(qs)] for i in range(n)]


def question_payloads(questions: list[str], n: int, extra: dict | None = None) -> list[dict]:
    """n requests that ask the bare questions in turn (what a client sends the gateway, or vLLM without RAG)."""
    return [{"messages": [{"role": "user", "content": questions[i % len(questions)]}], **({"extra": extra} if extra else {})}
            for i in range(n)]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout} s")


async def throughput(base_url: str, model: str, payloads: list[dict], concurrency: int, max_tokens: int,
                     vllm_v1: str) -> dict:
    """Aggregate completion tokens/s with `concurrency` requests in flight (prefix cache emptied first)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=1800)
    sem = asyncio.Semaphore(concurrency)
    tokens = prompt_tokens = 0

    async def one(p: dict):
        nonlocal tokens, prompt_tokens
        async with sem:
            r = await client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0,
                                                     extra_body={"min_tokens": max_tokens, "ignore_eos": True,
                                                                 **p.get("extra", {})},
                                                     messages=p["messages"])
            tokens += r.usage.completion_tokens
            prompt_tokens += r.usage.prompt_tokens or 0

    await one({"messages": WARM_UP})  # warm-up, not counted
    tokens = prompt_tokens = 0
    await asyncio.to_thread(reset_prefix_cache, vllm_v1)
    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in payloads))
    wall = time.perf_counter() - start
    await client.close()
    return {"tokens_per_s": round(tokens / wall, 1), "tokens": tokens, "requests": len(payloads),
            "wall_s": round(wall, 2), "prompt_tokens_mean": round(prompt_tokens / max(len(payloads), 1), 1)}


async def first_token_ms(base_url: str, model: str, messages: list[dict], max_tokens: int) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=600)
    start = time.perf_counter()
    ttft = None
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True,
                                                  extra_body={"min_tokens": max_tokens, "ignore_eos": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = (time.perf_counter() - start) * 1000
    await client.close()
    return ttft or float("nan")


async def latency_ms(base_url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=600)
    start = time.perf_counter()
    r = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                             extra_body={"min_tokens": max_tokens, "ignore_eos": True})
    ms = (time.perf_counter() - start) * 1000
    await client.close()
    return ms, (r.model_extra or {})


def hf_batched(bundle: Bundle, weights: str, prompts: list[list[dict]], levels: list[int], max_tokens: int,
               n_requests: dict[int, int]) -> dict:
    """Naive baseline: transformers generate on padded batches of `level` prompts, one batch after another."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The naive baseline runs the float merged weights where vLLM serves them in int8 (transformers has no int8
    # CPU kernels for them): its row is labelled with what it ran, beside vLLM's.
    merged = weights.startswith("merged")
    path = bundle.merged_path() if merged else bundle.base_model_path()
    tok = AutoTokenizer.from_pretrained(path if merged else (bundle.adapter_path() or path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if weights == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, bundle.adapter_path())
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    out = {}
    for level in levels:
        batch_texts = [texts[i % len(texts)] for i in range(n_requests[level])]
        tokens, start = 0, time.perf_counter()
        for s in range(0, len(batch_texts), level):
            enc = tok(batch_texts[s:s + level], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            tokens += (gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0]
        wall = time.perf_counter() - start
        out[str(level)] = {"tokens_per_s": round(tokens / wall, 1), "tokens": tokens, "wall_s": round(wall, 2)}
        print(f"  hf_batched  c={level:>2}: {out[str(level)]['tokens_per_s']:7.1f} tok/s", flush=True)
    return out


def lora_bundle_copy(bundle: Bundle, workdir: Path) -> Path:
    """A copy of the bundle with a random rank-r LoRA adapter and the same adapter merged (speed only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = workdir / bundle.path.name
    shutil.copytree(bundle.path, dst, ignore=shutil.ignore_patterns("data", "merged-w8a8"))
    llm_cfg = bundle.manifest.get("config", {}).get("llm", {})
    base = bundle.base_model_path()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=int(llm_cfg.get("lora_r", 16)), lora_alpha=int(llm_cfg.get("lora_alpha", 32)),
                      target_modules=list(llm_cfg.get("target_modules") or ["q_proj", "v_proj"]),
                      init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(dst / "llm" / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(dst / "llm" / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(dst / "llm" / "merged")
    manifest = json.loads((dst / "manifest.json").read_text())
    # adapter vs the same adapter merged, both in bf16: the int8 copy of the bundle's own weights stays out
    manifest["models"]["llm"].update({"adapter": "llm/adapter", "merged": "llm/merged", "merged_w8a8": None})
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def vllm_alone(bundle_dir: Path, use_merged: str, port: int, payloads: list[dict], level: int, max_tokens: int,
               log: Path) -> dict:
    from core.vllm_engine import plan_vllm
    from serving.vllm_server import VLLMServer

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["config"]["serve"]["use_merged"] = use_merged
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    b = Bundle.load(bundle_dir)
    plan = plan_vllm(b, port=port, api_key=KEY, device="cpu")
    server = VLLMServer(plan.argv, {**plan.env, "VLLM_SERVER_DEV_MODE": "1"}, log, f"http://127.0.0.1:{port}", KEY)
    server.start()
    try:
        server.wait_ready(900)
        url = f"http://127.0.0.1:{port}/v1"
        r = asyncio.run(throughput(url, plan.served_name, payloads, level, max_tokens, url))
    finally:
        server.stop()
    print(f"  vllm {plan.weights:>7} c={level:>2}: {r['tokens_per_s']:7.1f} tok/s", flush=True)
    return {"weights": plan.weights, **r}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/latest")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests at the highest concurrency (fewer below)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--samples", type=int, default=20, help="sequential requests for TTFT and added latency")
    p.add_argument("--port", type=int, default=18600)
    p.add_argument("--vllm-port", type=int, default=18601)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.json"))
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--vllm-arg", metavar="ARG", action="append", default=[], dest="vllm_args",
                   help="extra vLLM argument for `assistant serve`, repeatable: --vllm-arg=--block-size --vllm-arg=32")
    p.add_argument("--passages", default="",
                   help="also time the gateway at the highest concurrency with these passage counts per answer "
                        "(comma-separated, e.g. 1,2,3): the throughput a smaller context buys")
    p.add_argument("--lora-comparison", action="store_true",
                   help="also time vLLM serving a random rank-r adapter vs the same adapter merged (c=16)")
    args = p.parse_args(argv)

    levels = [int(c) for c in args.concurrency.split(",")]
    n_requests = {c: args.requests if c == max(levels) else max(2 * c, 4) for c in levels}
    bundle = Bundle.load(args.bundle)
    model = bundle.served_model_name
    questions = questions_for(bundle, max(args.requests, args.samples))
    load_before = os.getloadavg()

    # The same RAG prompts the gateway builds, so that vLLM-direct and gateway runs generate from equal input;
    # retrieval is timed with the gateway's thread setting (GatewaySettings.retrieval_threads).
    import torch

    from serving.settings import GatewaySettings

    threads_before = torch.get_num_threads()
    torch.set_num_threads(GatewaySettings.retrieval_threads)
    retriever = Retriever.load(bundle)
    focus = bundle_focus(bundle, retriever)
    retrieval_ms, focus_ms, prompts = [], [], []
    for q in questions:
        start = time.perf_counter()
        hits = retriever.search(q, k=bundle.top_k, trim=True)
        retrieval_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        passages = focus.apply(q, [h.to_dict() for h in hits])
        focus_ms.append((time.perf_counter() - start) * 1000)
        prompts.append(build_messages(q, passages))
    del retriever
    torch.set_num_threads(threads_before)
    print(f"retrieval in-process: median {statistics.median(retrieval_ms):.1f} ms over {len(questions)} questions; "
          f"cutting passages to {bundle.passage_tokens} tokens: median {statistics.median(focus_ms):.1f} ms")

    results: dict = {"vllm": {}, "gateway": {}, "hf_batched": {}, "ttft_ms": {}}
    log_dir = REPO / "logs"
    log_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "assistant", "serve", str(bundle.path), "--port", str(args.port),
           "--vllm-port", str(args.vllm_port), "--api-key", KEY, "--vllm-log", str(log_dir / "bench-vllm.log")]
    cmd += [f"--vllm-arg={a}" for a in args.vllm_args]
    with open(log_dir / "bench-serve.log", "wb") as serve_log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=serve_log, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
    gateway, vllm = f"http://127.0.0.1:{args.port}/v1", f"http://127.0.0.1:{args.vllm_port}/v1"
    weights = "?"
    try:
        wait_http(f"http://127.0.0.1:{args.port}/ready", 900, proc)
        req = urllib.request.Request(f"http://127.0.0.1:{args.port}/v1/models",
                                     headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            weights = json.loads(r.read())["data"][0]["weights"]
        print(f"serving {bundle.bundle_id} ({weights} weights); {args.max_tokens} tokens per request")
        for level in levels:
            n = n_requests[level]
            vllm_payloads = [{"messages": prompts[i % len(prompts)]} for i in range(n)]
            gw_payloads = question_payloads(questions, n)
            results["vllm"][str(level)] = asyncio.run(throughput(vllm, model, vllm_payloads, level, args.max_tokens,
                                                                 vllm))
            print(f"  vllm        c={level:>2}: {results['vllm'][str(level)]['tokens_per_s']:7.1f} tok/s", flush=True)
            results["gateway"][str(level)] = asyncio.run(throughput(gateway, model, gw_payloads, level,
                                                                    args.max_tokens, vllm))
            print(f"  gateway     c={level:>2}: {results['gateway'][str(level)]['tokens_per_s']:7.1f} tok/s", flush=True)

        ttft_gw, ttft_vllm, lat_gw, lat_vllm, gw_retrieval = [], [], [], [], []
        for i in range(args.samples):
            q, msgs = questions[i], prompts[i]
            reset_prefix_cache(vllm)
            ttft_gw.append(asyncio.run(first_token_ms(gateway, model, [{"role": "user", "content": q}], 8)))
            reset_prefix_cache(vllm)
            ttft_vllm.append(asyncio.run(first_token_ms(vllm, model, msgs, 8)))
            reset_prefix_cache(vllm)
            ms, extra = asyncio.run(latency_ms(gateway, model, [{"role": "user", "content": q}], 16))
            lat_gw.append(ms)
            gw_retrieval.append(float(extra.get("retrieval_ms", "nan")))
            reset_prefix_cache(vllm)
            lat_vllm.append(asyncio.run(latency_ms(vllm, model, msgs, 16))[0])
        results["ttft_ms"] = {"gateway_p50": round(statistics.median(ttft_gw), 1),
                              "vllm_p50": round(statistics.median(ttft_vllm), 1)}
        results["gateway_added_latency_ms_p50"] = round(statistics.median(lat_gw) - statistics.median(lat_vllm), 1)
        results["latency_16_tokens_ms_p50"] = {"gateway": round(statistics.median(lat_gw), 1),
                                               "vllm": round(statistics.median(lat_vllm), 1)}
        results["retrieval_ms_p50"] = round(statistics.median(gw_retrieval), 2)
        results["retrieval_ms_p50_in_process"] = round(statistics.median(retrieval_ms), 2)
        print(f"  TTFT p50: gateway {results['ttft_ms']['gateway_p50']} ms, vLLM {results['ttft_ms']['vllm_p50']} ms;"
              f" gateway adds {results['gateway_added_latency_ms_p50']} ms; retrieval p50 "
              f"{results['retrieval_ms_p50']} ms", flush=True)
        top = max(levels)
        for n_passages in [int(x) for x in args.passages.split(",") if x.strip()]:
            payloads = question_payloads(questions, n_requests[top], {"passages": n_passages})
            r = asyncio.run(throughput(gateway, model, payloads, top, args.max_tokens, vllm))
            results.setdefault("gateway_by_passages", {})[str(n_passages)] = r
            print(f"  gateway, {n_passages} passages c={top:>2}: {r['tokens_per_s']:7.1f} tok/s "
                  f"({r['prompt_tokens_mean']:.0f} prompt tokens)", flush=True)
        bare = question_payloads(questions, n_requests[top])
        results["question_only"] = {"vllm": {str(top): asyncio.run(throughput(vllm, model, bare, top,
                                                                              args.max_tokens, vllm))}}
        print(f"  vllm, bare questions c={top:>2}: "
              f"{results['question_only']['vllm'][str(top)]['tokens_per_s']:7.1f} tok/s", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()

    if not args.skip_hf:
        results["hf_batched"] = hf_batched(bundle, weights, prompts, levels, args.max_tokens, n_requests)
        top = max(levels)
        bare_prompts = [[{"role": "user", "content": q}] for q in questions]
        print("  (bare questions)")
        results.setdefault("question_only", {})["hf_batched"] = hf_batched(
            bundle, weights, bare_prompts, [top], args.max_tokens, n_requests)

    if args.lora_comparison:
        top = max(levels)
        payloads = [{"messages": prompts[i % len(prompts)]} for i in range(n_requests[top])]
        with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
            copy = lora_bundle_copy(bundle, Path(tmp))
            results["lora_vs_merged"] = {
                "adapter": vllm_alone(copy, "no", args.vllm_port, payloads, top, args.max_tokens,
                                      log_dir / "bench-vllm-adapter.log"),
                "merged": vllm_alone(copy, "yes", args.vllm_port, payloads, top, args.max_tokens,
                                     log_dir / "bench-vllm-merged.log")}

    summary = {k: {lvl: v["tokens_per_s"] for lvl, v in results[k].items()} for k in ("vllm", "gateway", "hf_batched")}
    out = {**summary, "ttft_ms": results["ttft_ms"], "retrieval_ms_p50": results.get("retrieval_ms_p50"),
           "retrieval_ms_p50_in_process": results.get("retrieval_ms_p50_in_process"),
           "passage_cut_ms_p50": round(statistics.median(focus_ms), 2), "passage_tokens": list(bundle.passage_tokens),
           "gateway_added_latency_ms_p50": results.get("gateway_added_latency_ms_p50"),
           "latency_16_tokens_ms_p50": results.get("latency_16_tokens_ms_p50"),
           "gateway_by_passages": {n: {"tokens_per_s": v["tokens_per_s"], "prompt_tokens_mean": v["prompt_tokens_mean"]}
                                   for n, v in results.get("gateway_by_passages", {}).items()},
           "question_only": {k: {lvl: v["tokens_per_s"] for lvl, v in r.items()}
                             for k, r in results.get("question_only", {}).items()},
           **({"lora_vs_merged_tokens_per_s": {k: v["tokens_per_s"] for k, v in results["lora_vs_merged"].items()}}
              if "lora_vs_merged" in results else {}),
           "details": results,
           "meta": {"bundle": bundle.bundle_id, "weights": weights, "profile": bundle.manifest.get("profile"),
                    "hf_batched_weights": ("merged, float32 (vLLM serves them int8)" if weights == "merged-w8a8"
                                           else f"{weights}, float32"),
                    "max_tokens": args.max_tokens, "requests": n_requests, "samples": args.samples,
                    "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n engine       " + "  ".join(f"c={lvl:>3}" for lvl in levels))
    for k in ("vllm", "gateway", "hf_batched"):
        print(f" {k:<12} " + "  ".join(f"{summary[k].get(str(lvl), float('nan')):5.0f}" for lvl in levels))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
