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


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where it is ~2.5x faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(device: str):
    """Mixed precision for training (weights stay fp32): bf16 on GPUs and CPUs that support it, fp16 on older
    GPUs, none elsewhere. ASSISTANT_AUTOCAST=off (or bf16 / fp16) overrides."""
    import torch

    choice = os.environ.get("ASSISTANT_AUTOCAST", "auto").lower()
    if choice in ("0", "off", "no", "false", "fp32"):
        return None
    if choice in ("bf16", "bfloat16"):
        return torch.bfloat16
    if choice in ("fp16", "float16"):
        return torch.float16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast_context(device: str):
    """torch.autocast in ``autocast_dtype(device)``, or a context that does nothing where it is None."""
    import contextlib

    import torch

    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
