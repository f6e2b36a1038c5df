"""The one place where device and dtype are chosen (env ASSISTANT_DEVICE overrides everything)."""

from __future__ import annotations

import os


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def get_device(preference: str = "auto") -> str:
    """Return 'cuda', 'mps' or 'cpu'. ASSISTANT_DEVICE, then the config's value, then what the machine has."""
    import torch

    choice = os.environ.get("ASSISTANT_DEVICE") or preference or "auto"
    if choice != "auto":
        if choice.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} asked for, but CUDA is not available on this machine")
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dtype(device: str):
    """bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on the CPU (bf16 matmuls are slow there)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def set_threads() -> None:
    """Let torch use every core we were given (2 here), unless the user said otherwise."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
