"""Start and supervise the stock vLLM OpenAI-compatible server for a bundle.

    .venv/bin/python -m serving.vllm_server bundles/latest --port 8000    # vLLM alone, Ctrl-C stops it

`plan_vllm` decides what vLLM serves and with which arguments: the bundle's merged weights, or the base
model with its LoRA adapter, or the base model alone; `VLLMServer` runs it as a child process in its own
process group with its output in a log file, waits for /health, notices when it dies, and stops it with
SIGTERM (then SIGKILL) so no engine process outlives the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from builder.config import ServeConfig
from serving.bundle import TOKENIZER_FILES, Bundle
from serving.settings import served_model_name

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


def serve_config(bundle: Bundle) -> dict:
    return dict(bundle.manifest.get("config", {}).get("serve", {}))


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
    choice = str(serve_config(bundle).get("use_merged", "auto")).lower()
    if not adapter and not merged:
        return "base", "the bundle has no fine-tuned weights (no adapter shipped), so the base model is served"
    if choice in ("yes", "true", "1"):
        if merged:
            return "merged", "serve.use_merged=yes"
        return "adapter", "serve.use_merged=yes but the bundle has no merged weights; serving the adapter"
    if choice in ("no", "false", "0"):
        if adapter:
            return "adapter", "serve.use_merged=no"
        return "merged", "serve.use_merged=no but the bundle has no adapter; serving the merged weights"
    on_gpu = device.startswith("cuda")
    if on_gpu and adapter:
        return "adapter", "auto: on a GPU LoRA kernels are cheap, so base + adapter"
    if not on_gpu and merged:
        return "merged", "auto: on the CPU vLLM's LoRA path costs 3.4x-11x throughput (BENCHMARKS.md), so merged weights"
    if adapter:
        return "adapter", "auto: no merged weights in the bundle, so base + adapter"
    return "merged", "auto: the bundle has merged weights only"


def int8_weights(bundle: Bundle, device: str) -> str | None:
    """The int8 copy of the merged weights, where vLLM should serve it: on the CPU (oneDNN int8 kernels) when
    the bundle has one and serve.quantize is not 'none'."""
    if device.startswith("cuda") or str(serve_config(bundle).get("quantize", "auto")).lower() == "none":
        return None
    return bundle.merged_w8a8_path()


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


def cpu_env(serve_cfg: dict, environ: dict | None = None) -> dict[str, str]:
    """vLLM-CPU settings: KV-cache size, and OpenMP threads bound to every core we may use with none held
    back (vLLM's default pins one core and reserves another: 3.7x fewer tokens/s on a 2-core machine).
    Values already in the environment win."""
    environ = os.environ if environ is None else environ
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    wanted = {"VLLM_CPU_KVCACHE_SPACE": str(serve_cfg.get("cpu_kvcache_gib", 2)),
              "VLLM_CPU_OMP_THREADS_BIND": cpu_list(cores),
              "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return {k: environ.get(k, v) for k, v in wanted.items()}


def plan_vllm(bundle: Bundle, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              device: str = "cpu", extra_args: list[str] | None = None, python: str | None = None) -> VLLMPlan:
    """The vLLM command line and environment for a bundle on a device ('cuda...' or 'cpu')."""
    cfg = serve_config(bundle)
    name = served_model_name(bundle)
    weights, reason = choose_weights(bundle, device)
    base = bundle.base_model_path()
    argv = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host,
            "--port", str(port), "--max-model-len", str(cfg.get("max_model_len", 2048)),
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
    if api_key:
        argv += ["--api-key", api_key]
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if device.startswith("cuda"):
        argv += ["--tensor-parallel-size", str(cfg.get("tensor_parallel_size", 1)),
                 "--data-parallel-size", str(cfg.get("data_parallel_size", 1)),
                 "--gpu-memory-utilization", str(cfg.get("gpu_memory_utilization", 0.85))]
    else:
        env.update(cpu_env(cfg))
        argv += ["--block-size", str(cfg.get("cpu_block_size", ServeConfig.cpu_block_size))]
    argv += list(extra_args or [])
    return VLLMPlan(argv=argv, env=env, served_name=name, weights=weights, reason=reason, model_names=names)


def _redact(argv: list[str]) -> str:
    out = []
    for i, a in enumerate(argv):
        out.append("***" if i > 0 and argv[i - 1] == "--api-key" else a)
    return " ".join(out)


class VLLMServer:
    """A supervised vLLM child process."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str | Path, url: str,
                 api_key: str | None = None):
        self.argv, self.env = argv, env
        self.log_path = Path(log_path)
        self.url = url.rstrip("/")  # http://host:port (no /v1)
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self._stopping = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab", buffering=0) as log:  # the child keeps its own copy of the descriptor
            log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {_redact(self.argv)}\n".encode())
            # preexec_fn only calls prctl through a function pointer resolved here, before the fork.
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True,
                                         preexec_fn=_parent_death_signal())  # noqa: PLW1509

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def died_message(self) -> str:
        code = self.proc.returncode if self.proc else None
        return (f"vLLM exited (code {code}). The end of its log ({self.log_path}):\n"
                f"{self.log_tail()}\n--- full log: {self.log_path}")

    def wait_ready(self, timeout: float = 900.0, poll: float = 1.0) -> float:
        """Block until /health answers; seconds waited. Raises VLLMError if vLLM exits or times out."""
        start = time.monotonic()
        while True:
            if not self.alive():
                raise VLLMError(self.died_message())
            if self.healthy():
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                self.stop()
                raise VLLMError(f"vLLM did not become healthy within {timeout:.0f} s; see {self.log_path}:\n"
                                f"{self.log_tail()}")
            time.sleep(poll)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the whole process group (vLLM's engine runs in child processes), SIGKILL after timeout."""
        self._stopping = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Engine workers can linger a moment after the API process; the group is ours to clean up.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    @property
    def stopping(self) -> bool:
        return self._stopping


def _parent_death_signal():
    """A preexec_fn that makes the child get SIGTERM if the launcher dies without cleaning up (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_signal


def main(argv: list[str] | None = None) -> int:
    import argparse

    from builder.device import get_device

    p = argparse.ArgumentParser(description="Run vLLM for a bundle (no gateway, no UI).")
    p.add_argument("bundle", nargs="?", default="bundles")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("ASSISTANT_API_KEY"))
    p.add_argument("--log", default=None, help="log file (default logs/vllm-PORT.log)")
    args, extra = p.parse_known_args(argv)
    bundle = Bundle.load(args.bundle)
    plan = plan_vllm(bundle, host=args.host, port=args.port, api_key=args.api_key, device=get_device(),
                     extra_args=extra)
    server = VLLMServer(plan.argv, plan.env, args.log or f"logs/vllm-{args.port}.log", f"http://{args.host}:{args.port}")
    print(f"vLLM: {plan.weights} weights ({plan.reason}); log {server.log_path}", flush=True)
    server.start()
    try:
        seconds = server.wait_ready()
        print(f"vLLM ready in {seconds:.0f} s: http://{args.host}:{args.port}/v1 model {plan.served_name}", flush=True)
        while server.alive():
            time.sleep(1)
        print(server.died_message(), file=sys.stderr)
        return 1
    except VLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
