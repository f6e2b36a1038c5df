"""Console output for the build: one line per step with its duration, progress bars on long loops."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Ctrl-C raises KeyboardInterrupt wherever the main thread is. Python drops an exception raised while it runs a
# finalizer (a __del__ or weakref callback during garbage collection), so a Ctrl-C can be lost there; the
# handler below also remembers it, and every stage boundary and the final commit re-raise it.
_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """Make Ctrl-C (SIGINT) sticky for this process (main thread only; call from the CLI)."""
    _interrupted.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived, even one an earlier finalizer swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def step(name: str) -> Iterator[dict]:
    """Print 'name ...' then 'name done in X s'; the yielded dict collects the seconds under 'seconds'."""
    info: dict = {}
    check_interrupted()
    say(f"==> {name}")
    start = time.perf_counter()
    try:
        yield info
    finally:
        info["seconds"] = round(time.perf_counter() - start, 2)
        say(f"    {name}: {info['seconds']:.1f} s")
    check_interrupted()


def progress(iterable, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kw)
