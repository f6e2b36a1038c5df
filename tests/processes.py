"""This machine's processes by command line (Linux /proc), for tests that find or inspect a server they started."""

from __future__ import annotations

from pathlib import Path


def command_lines() -> dict[int, list[bytes]]:
    """{pid: argv} of every process whose command line can be read."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            out[int(entry.name)] = argv
    return out


def pid_of(matches, what: str) -> int:
    """The one process whose argv ``matches`` (a predicate), or an AssertionError naming ``what``."""
    for pid, argv in command_lines().items():
        if matches(argv):
            return pid
    raise AssertionError(f"no process: {what}")
