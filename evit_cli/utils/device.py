"""Devices and mixed precision: which device a name means, how to describe it, and the one
autocast policy that benchmarking and training share."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from ..errors import EvitError


def resolve_device(name: str | None = None) -> torch.device:
    """The device ``name`` means (``None``: the GPU where there is one, else the CPU)."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvitError("--device cuda was asked for but PyTorch sees no CUDA GPU here: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise EvitError(f"unknown device {name!r}: use cpu or cuda") from None


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads PyTorch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def amp_dtype(device: torch.device) -> torch.dtype:
    """The half-precision type of ``--amp``: bfloat16 wherever the device has it (CPUs, Ampere and
    later GPUs), float16 on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on ``device`` with :func:`amp_dtype` when ``enabled``; full precision otherwise."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=amp_dtype(device))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
