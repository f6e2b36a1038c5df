"""`assistant serve`: vLLM with the bundle's fine-tuned model, the RAG gateway and the chat UI, together.

    .venv/bin/assistant serve bundles/latest --port 7860 --vllm-port 8000

vLLM runs as a supervised child process (its log in logs/vllm-PORT.log); the gateway loads the index and
the UI while vLLM starts, serves once vLLM is healthy, and stops vLLM on Ctrl-C or SIGTERM. If vLLM dies,
the launcher says so with the end of vLLM's log and exits with status 1.
"""

from __future__ import annotations

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


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 7860, vllm_port: int = 8000,
          api_key: str | None = None, use_vllm: bool = True, vllm_log: str | Path | None = None,
          vllm_args: list[str] | None = None, ready_timeout: float = 900.0) -> int:
    """Serve a bundle until interrupted. Returns the process exit status."""
    import uvicorn

    from serving.api import create_app
    from serving.vllm_server import VLLMServer

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
            plan = plan_vllm(b, host=VLLM_HOST, port=vllm_port, api_key=api_key, device=device, extra_args=vllm_args)
            log_path = Path(vllm_log or f"logs/vllm-{vllm_port}.log")
            server = VLLMServer(plan.argv, plan.env, log_path, vllm_url, api_key)
            _say(f"==> vLLM on {device}: {plan.weights} weights ({plan.reason})")
            _say(f"    log: {log_path.resolve()}")
            server.start()
            settings = GatewaySettings(models=[ServedModel(name, b.path, plan.served_name, plan.weights)],
                                       vllm_base_url=f"{vllm_url}/v1", vllm_api_key=api_key, api_key=api_key)
        else:
            _say("==> --no-vllm: generating in-process with transformers (slow; for debugging)")
            weights = "adapter" if b.adapter_path() else "base"
            settings = GatewaySettings(models=[ServedModel(name, b.path, name, weights)], api_key=api_key,
                                       local_generation=True)
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
            while server is not None and not uv.should_exit:
                if not server.alive() and not server.stopping:
                    print(f"error: {server.died_message()}\nerror: vLLM stopped; shutting the gateway down.",
                          file=sys.stderr, flush=True)
                    state["code"] = 1
                    uv.should_exit = True
                    return
                time.sleep(1.0)

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


def _banner(host: str, port: int, vllm_port: int | None, model: str, keyed: bool) -> None:
    h = local_host(host)
    key = " (needs the API key)" if keyed else ""
    lines = ["", f"  Chat UI:          http://{h}:{port}/",
             f"  RAG gateway:      http://{h}:{port}/v1   model '{model}'{key}  (OpenAI-compatible, with sources)"]
    if vllm_port:
        lines.append(f"  Raw model (vLLM): http://{VLLM_HOST}:{vllm_port}/v1   model '{model}'{key}  (no retrieval; "
                     "this machine only)")
    lines += ["  Press Ctrl-C to stop.", ""]
    _say("\n".join(lines))
