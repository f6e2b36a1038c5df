"""`assistant serve`: vLLM with the bundle's fine-tuned model, the RAG gateway and the chat UI, together.

    .venv/bin/assistant serve bundles/latest --port 7860 --vllm-port 8000

vLLM runs as a supervised child process (its log in logs/vllm-PORT.log); the gateway loads the index and
the UI while vLLM starts, serves once vLLM is healthy, and stops vLLM on Ctrl-C or SIGTERM. If vLLM dies,
the launcher says so with the end of vLLM's log and exits with status 1.
"""

from __future__ import annotations

import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from core.bundle import Bundle
from core.device import get_device
from core.vllm_engine import VLLMError, plan_vllm
from serving.settings import GatewaySettings, ServedModel


class _Terminated(Exception):
    """SIGTERM arrived: shut down as on Ctrl-C."""


def _on_sigterm(_signum, _frame):
    raise _Terminated()


# vLLM listens on loopback whatever the gateway's host: the gateway is the door for everyone else, and vLLM guards
# only some of its routes with the key.
VLLM_HOST = "127.0.0.1"


def _say(msg: str) -> None:
    print(msg, flush=True)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def local_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 7860, vllm_port: int = 8000,
          api_key: str | None = None, use_vllm: bool = True, vllm_log: str | Path | None = None,
          vllm_args: list[str] | None = None, ready_timeout: float = 900.0, allow_open: bool = False,
          max_pending: int = 128, max_restarts: int = 3) -> int:
    """Serve a bundle until interrupted. Returns the process exit status. A gateway reachable from other
    machines (a host other than loopback) without ``api_key`` would hand the whole knowledge base to anyone, so
    it is refused unless ``allow_open`` says that is what is wanted."""
    import uvicorn

    from serving.api import create_app
    from serving.vllm_server import VLLMServer

    if not api_key and not is_loopback(host) and not allow_open:
        print(f"error: --host {host} makes the assistant reachable from other machines, and it has no API key: "
              "anyone could read the knowledge base. Set one (env ASSISTANT_API_KEY or --api-key-file FILE), "
              "or pass --allow-open if an open server is really wanted.", file=sys.stderr)
        return 2
    b = Bundle.load(bundle)
    name = b.served_model_name
    busy = ([port] if not port_free(host, port) else []) + (
        [vllm_port] if use_vllm and not port_free(VLLM_HOST, vllm_port) else [])
    if busy:
        print(f"error: port {', '.join(map(str, busy))} on {host} is already in use; choose another with "
              "--port / --vllm-port", file=sys.stderr)
        return 2
    if use_vllm and port == vllm_port:
        print("error: --port and --vllm-port must differ", file=sys.stderr)
        return 2

    previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    server: VLLMServer | None = None
    exit_code = 0
    try:
        _say(f"==> serving bundle {b.bundle_id} ({b.path}) as model '{name}'")
        vllm_url = f"http://{VLLM_HOST}:{vllm_port}"
        if use_vllm:
            device = get_device(b.config.device)
            # vLLM always has a key: the gateway's, or (an open gateway) a random one only the gateway knows, so
            # vLLM's own routes are never open even when the gateway is.
            vllm_key = api_key or secrets.token_urlsafe(24)
            plan = plan_vllm(b, host=VLLM_HOST, port=vllm_port, api_key=vllm_key, device=device,
                             extra_args=vllm_args)
            log_path = Path(vllm_log or f"logs/vllm-{vllm_port}.log")
            server = VLLMServer(plan.argv, plan.env, log_path, vllm_url, vllm_key)
            _say(f"==> vLLM on {device}: {plan.weights} weights ({plan.reason})")
            _say(f"    log: {log_path.resolve()}")
            server.start()
            settings = GatewaySettings(models=[ServedModel(name, b.path, plan.served_name, plan.weights)],
                                       vllm_base_url=f"{vllm_url}/v1", vllm_api_key=vllm_key, api_key=api_key,
                                       max_pending=max_pending)
        else:
            _say("==> --no-vllm: generating in-process with transformers (slow; for debugging)")
            weights = "adapter" if b.adapter_path() else "base"
            settings = GatewaySettings(models=[ServedModel(name, b.path, name, weights)], api_key=api_key,
                                       local_generation=True, max_pending=max_pending)
        # Load the index, the embedder and the UI while vLLM starts.
        t0 = time.monotonic()
        app = create_app(settings)
        _say(f"==> gateway loaded in {time.monotonic() - t0:.0f} s")
        if server is not None:
            _say("==> waiting for vLLM to load the model (a minute or two on a CPU)…")
            waited = server.wait_ready(timeout=ready_timeout)
            _say(f"==> vLLM ready after {waited:.0f} s")

        uv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
        state = {"code": 0}

        def watch():
            # Announce the URLs once the gateway listens, then watch vLLM for as long as we serve.
            while not uv.started and not uv.should_exit:
                time.sleep(0.1)
            if uv.started:
                _banner(host, port, vllm_port if server else None, plan.served_name if server else name,
                        bool(api_key))
            if server is not None:
                supervise(server, uv, state, max_restarts, ready_timeout)

        threading.Thread(target=watch, name="vllm-watchdog", daemon=True).start()
        uv.run()
        exit_code = state["code"]
        if exit_code == 0 and not uv.started:
            print(f"error: the gateway could not start on {host}:{port}", file=sys.stderr)
            exit_code = 1
    except VLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        exit_code = 1
    except (KeyboardInterrupt, _Terminated):
        _say("==> stopping")
    finally:
        if server is not None:
            server.stop()
            _say("==> vLLM stopped")
        signal.signal(signal.SIGTERM, previous_sigterm)
    return exit_code


RESTART_WINDOW_S = 600.0  # restarts within this long count towards max_restarts
HUNG_AFTER_S = 30.0  # a vLLM alive whose /health has not answered for this long is hung: it is restarted
BACKOFF_S = (1.0, 4.0, 15.0)


def supervise(server, uv, state: dict, max_restarts: int, ready_timeout: float) -> None:
    """Watch vLLM for as long as the gateway serves: a dead one, or a hung one (alive, /health silent for
    HUNG_AFTER_S), is restarted after a backoff, at most ``max_restarts`` times within RESTART_WINDOW_S; past
    that the gateway shuts down with vLLM's last words (exit status 1). While vLLM is down, requests get a clean
    503 and /ready says false."""
    restarts: list[float] = []
    silent_since: float | None = None
    while not uv.should_exit:
        time.sleep(1.0)
        if server.stopping or uv.should_exit:
            return
        if server.alive():
            if server.healthy(timeout=5.0):
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since < HUNG_AFTER_S:
                continue
            why = f"vLLM has not answered /health for {HUNG_AFTER_S:.0f} s (hung)"
        else:
            why = server.died_message()
        # Whatever is left of it (a hung server, or the engine processes of a dead one) goes with its group.
        server.stop(timeout=5.0)
        server.stopping_reset()
        silent_since = None
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
        if len(restarts) >= max_restarts:
            print(f"error: {why}\nerror: vLLM stopped {len(restarts) + 1} times in {RESTART_WINDOW_S / 60:.0f} "
                  "minutes; shutting the gateway down.", file=sys.stderr, flush=True)
            state["code"] = 1
            uv.should_exit = True
            return
        wait = BACKOFF_S[min(len(restarts), len(BACKOFF_S) - 1)]
        restarts.append(now)
        print(f"error: {why}\n==> restarting vLLM in {wait:.0f} s (restart {len(restarts)} of at most "
              f"{max_restarts} in {RESTART_WINDOW_S / 60:.0f} minutes)", file=sys.stderr, flush=True)
        time.sleep(wait)
        if uv.should_exit:
            return
        try:
            server.start()
            waited = server.wait_ready(timeout=ready_timeout)
            _say(f"==> vLLM restarted and ready after {waited:.0f} s")
        except VLLMError as exc:
            print(f"error: the restart failed: {str(exc)[-400:]}", file=sys.stderr, flush=True)


def _banner(host: str, port: int, vllm_port: int | None, model: str, keyed: bool) -> None:
    h = local_host(host)
    key = " (needs the API key)" if keyed else ""
    lines = ["", f"  Chat UI:          http://{h}:{port}/",
             f"  RAG gateway:      http://{h}:{port}/v1   model '{model}'{key}  (OpenAI-compatible, with sources)"]
    if vllm_port:
        lines.append(f"  Raw model (vLLM): http://{VLLM_HOST}:{vllm_port}/v1   model '{model}'"
                     + (key if keyed else " (an internal key only the gateway holds)")
                     + "  (no retrieval; this machine only)")
    lines += ["  Press Ctrl-C to stop.", ""]
    _say("\n".join(lines))
