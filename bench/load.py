"""Load on the gateway: concurrent streaming chats, then a burst past the queue. Loopback only, bounded.

Starts `assistant serve BUNDLE` on 127.0.0.1 (real vLLM, a random key in the environment), or uses a running
gateway (--url, key from env ASSISTANT_API_KEY), and measures with the official async OpenAI client:

1. ``--concurrent`` streaming chats at once (default 64) on a gateway with `assistant serve`'s queue (128):
   errors, time to first token, tokens/s;
2. a burst of ``--burst-factor`` times a gateway's queue at once, on a gateway started again with a queue of
   ``--burst-queue`` (default 16): every request must either answer or get a 429 within a second; none may wait
   past ``--timeout``. The load generator runs on the same cores as the gateway and vLLM, and opening a thousand
   connections at once costs Python seconds on two cores whatever the server does, so the burst is sized to the
   machine rather than to the default queue; ``--burst-queue 128`` measures that too.

    .venv/bin/python bench/load.py --bundle /tmp/bundles/latest --out bench/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
QUESTION = "How much DAP fertilizer should I apply per acre when planting maize?"
MAX_REQUESTS = 5000  # whatever the options say, one run sends no more than this


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(bundle: str, key: str, max_pending: int, log: Path) -> tuple[subprocess.Popen, str]:
    port, vllm_port = free_port(), free_port()
    env = {**os.environ, "ASSISTANT_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "assistant", "serve", bundle, "--host", "127.0.0.1", "--port", str(port),
           "--vllm-port", str(vllm_port), "--max-pending", str(max_pending), "--vllm-log", str(log) + ".vllm"]
    out = open(log, "wb")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`assistant serve` exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    raise RuntimeError(f"the gateway was not ready in 900 s; see {log}")


async def one_chat(client, stream: bool, timeout: float) -> dict:
    import openai

    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with asyncio.timeout(timeout):
            if stream:
                chunks = await client.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": QUESTION}], stream=True,
                    max_tokens=32)
                async for c in chunks:
                    if c.choices and c.choices[0].delta.content:
                        first = first or time.perf_counter() - t0
                        tokens += 1
            else:
                r = await client.chat.completions.create(
                    model="assistant", messages=[{"role": "user", "content": QUESTION}], max_tokens=32)
                tokens = r.usage.completion_tokens if r.usage else 0
        return {"ok": True, "s": time.perf_counter() - t0, "ttft_s": first, "tokens": tokens}
    except openai.RateLimitError as exc:
        return {"ok": False, "status": 429, "s": time.perf_counter() - t0,
                "retry_after": exc.response.headers.get("retry-after")}
    except TimeoutError:
        return {"ok": False, "status": "timeout", "s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - every other failure is an error of the run
        return {"ok": False, "status": getattr(exc, "status_code", type(exc).__name__), "s": time.perf_counter() - t0}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


async def phase(url: str, key: str, n: int, stream: bool, timeout: float) -> dict:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                           http_client=httpx.AsyncClient(limits=limits, timeout=timeout)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_chat(client, stream, timeout) for _ in range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    limited = [r for r in results if r.get("status") == 429]
    errors = [r for r in results if not r["ok"] and r.get("status") != 429]
    return {"requests": n, "stream": stream, "ok": len(ok), "rate_limited": len(limited), "errors": len(errors),
            "error_kinds": sorted({str(r["status"]) for r in errors}), "wall_s": round(wall, 2),
            "ttft_p50_s": pct([r["ttft_s"] for r in ok if r.get("ttft_s")], 0.5),
            "ttft_p99_s": pct([r["ttft_s"] for r in ok if r.get("ttft_s")], 0.99),
            "answer_p99_s": pct([r["s"] for r in ok], 0.99),
            "rate_limited_p99_s": pct([r["s"] for r in limited], 0.99),
            "slowest_s": pct([r["s"] for r in results], 1.0),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1) if wall else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="serve this bundle for the run (loopback, real vLLM)")
    ap.add_argument("--url", default=None, help="or measure a gateway already running on this machine")
    ap.add_argument("--concurrent", type=int, default=64, help="streaming chats at once in phase 1 (default 64)")
    ap.add_argument("--max-pending", type=int, default=128, help="the queue of the gateway phase 1 runs on")
    ap.add_argument("--burst-queue", type=int, default=16, help="the queue of the gateway the burst runs on")
    ap.add_argument("--burst-factor", type=int, default=10, help="phase 2 sends this many times the queue")
    ap.add_argument("--timeout", type=float, default=120.0, help="a request waiting longer counts as failed")
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args(argv)
    if bool(args.bundle) == bool(args.url):
        ap.error("give exactly one of --bundle or --url")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        ap.error("--url must be a loopback address: this script loads only this machine")
    queue = args.burst_queue if args.bundle else args.max_pending
    burst = queue * args.burst_factor
    if args.concurrent + burst > MAX_REQUESTS:
        ap.error(f"at most {MAX_REQUESTS} requests a run")

    proc = None
    key = os.environ.get("ASSISTANT_API_KEY", "") if args.url else secrets.token_urlsafe(16)
    log = Path(args.out or "bench/work/load").with_suffix(".serve.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if args.bundle:
            proc, url = start_gateway(args.bundle, key, args.max_pending, log)
        else:
            url = args.url.rstrip("/")
        startup = time.perf_counter() - t0
        concurrent = asyncio.run(phase(url, key, args.concurrent, True, args.timeout))
        print(json.dumps({"concurrent": concurrent}), flush=True)
        if args.bundle and args.burst_queue != args.max_pending:
            stop(proc)
            proc, url = start_gateway(args.bundle, key, args.burst_queue, log)
        burst_result = asyncio.run(phase(url, key, burst, False, args.timeout))
        print(json.dumps({"burst": burst_result}), flush=True)
    finally:
        stop(proc)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    result = {"concurrent": {**concurrent, "queue": args.max_pending}, "burst": {**burst_result, "queue": queue},
              "run": {"bundle": args.bundle or args.url, "commit": commit, "startup_s": round(startup, 1),
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timeout_s": args.timeout}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    passed = (concurrent["errors"] == 0 and concurrent["ok"] == args.concurrent and burst_result["errors"] == 0
              and (burst_result["rate_limited_p99_s"] or 0) < 1.0)
    print(f"{'PASS' if passed else 'FAIL'}: {concurrent['ok']}/{args.concurrent} streams, {concurrent['errors']} "
          f"errors; burst of {burst}: {burst_result['ok']} answered, {burst_result['rate_limited']} got 429 "
          f"(p99 {burst_result['rate_limited_p99_s']} s), {burst_result['errors']} errors")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
