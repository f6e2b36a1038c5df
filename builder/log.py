"""Console output for the build: one line per step with its duration, progress bars on long loops."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def step(name: str) -> Iterator[dict]:
    """Print 'name ...' then 'name done in X s'; the yielded dict collects the seconds under 'seconds'."""
    info: dict = {}
    say(f"==> {name}")
    start = time.perf_counter()
    try:
        yield info
    finally:
        info["seconds"] = round(time.perf_counter() - start, 2)
        say(f"    {name}: {info['seconds']:.1f} s")


def progress(iterable, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kw)
