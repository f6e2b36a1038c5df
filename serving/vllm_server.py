"""Supervise the stock vLLM OpenAI-compatible server for a bundle.

    .venv/bin/python -m serving.vllm_server bundles/latest --port 8000    # vLLM alone, Ctrl-C stops it

What vLLM serves and with which arguments is `core.vllm_engine.plan_vllm`; `VLLMServer` runs that command as a
child process in its own process group with its output in a log file, waits for /health, notices when it dies,
and stops it with SIGTERM (then SIGKILL) so no engine process outlives the launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from core.bundle import Bundle
from core.device import get_device
from core.vllm_engine import VLLMError, plan_vllm


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

    def stopping_reset(self) -> None:
        """After a stop the supervisor chose (a hung vLLM), so that the restarted one is watched again."""
        self._stopping = False


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

    p = argparse.ArgumentParser(description="Run vLLM for a bundle (no gateway, no UI).")
    p.add_argument("bundle", nargs="?", default="bundles")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, help="the key vLLM requires, on the file's first line "
                                                          "(default: env ASSISTANT_API_KEY)")
    p.add_argument("--log", default=None, help="log file (default logs/vllm-PORT.log)")
    args, extra = p.parse_known_args(argv)
    from serving.settings import read_api_key

    key = read_api_key(args.api_key_file)
    bundle = Bundle.load(args.bundle)
    plan = plan_vllm(bundle, host=args.host, port=args.port, api_key=key, device=get_device(), extra_args=extra)
    server = VLLMServer(plan.argv, plan.env, args.log or f"logs/vllm-{args.port}.log",
                        f"http://{args.host}:{args.port}", key)
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
