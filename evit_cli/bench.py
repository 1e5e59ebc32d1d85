"""Dense vs EViT, side by side in one run: throughput, latency, MACs, tokens."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import __version__, adapters
from .core import dense_copy, get_config
from .errors import EvitError


# --------------------------------------------------------------------------- counting


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one SDPA call: QK^T and AV, 2 FLOPs per MAC."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _attention_mapping() -> dict:
    """Count the fused-attention kernels the installed FlopCounterMode leaves out."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        op = getattr(aten, name, None)
        if op is not None and op.default not in flop_registry and op not in flop_registry:
            mapping[op.default] = lambda q, k, v, *a, out_shape=None, **kw: _sdpa_flop(q, k, v)
    return mapping


def count_macs(model: nn.Module, img_size: int, device: str | torch.device = "cpu") -> int:
    """Multiply-accumulates of one forward pass on one image (FLOPs / 2), attention included."""
    x = torch.randn(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_attention_mapping())
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_tokens(model: nn.Module, img_size: int, device="cpu") -> list[int]:
    """Sequence length coming out of each EViT block, measured in a forward pass."""
    seen: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(int(o.shape[1]))) for b in adapters.evit_blocks(model)]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, img_size, img_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return seen


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def time_side_by_side(models: dict[str, nn.Module], x: torch.Tensor, *, warmup: int, reps: int, amp: bool,
                      advance=None) -> dict[str, list[float]]:
    """Seconds per forward pass for each model, interleaved rep by rep so that drift hits all alike."""
    device = x.device
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode(), _autocast(device, amp):
        for i in range(warmup + reps):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                models[name](x)
                _sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
                if advance:
                    advance()
    return times


def median_times(models: dict[str, nn.Module], x: torch.Tensor, *, warmup: int = 1, reps: int, amp: bool = False,
                 advance=None) -> dict[str, float]:
    """Median seconds per forward pass of each model, timed side by side (``advance()`` after each pass)."""
    times = time_side_by_side(models, x, warmup=warmup, reps=reps, amp=amp, advance=advance)
    return {name: statistics.median(t) for name, t in times.items()}


def _summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "reps": len(ms),
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvitError("--device cuda was asked for but PyTorch sees no CUDA GPU here: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise EvitError(f"unknown device {name!r}: use cpu or cuda") from None


def bench(
    model: nn.Module | str | os.PathLike,
    *,
    batch: int = 256,
    device: str = "cpu",
    amp: bool = False,
    compile: bool = False,
    warmup: int = 2,
    reps: int = 10,
    latency_reps: int | None = None,
    progress: bool = False,
) -> dict:
    """Benchmark an EViT model against its dense original, in one run.

    ``model`` is an EViT model or anything :func:`evit_cli.load_model` takes.
    Returns the report as a dict (see :mod:`evit_cli.report` to render it):
    images/s at ``batch``, latency per batch and at batch 1 (median, spread),
    GMACs per image, parameters, tokens after each EViT layer, speedups.
    """
    if batch < 1:
        raise EvitError(f"--batch must be at least 1, got {batch}")
    if reps < 1 or warmup < 0:
        raise EvitError("--reps must be at least 1 and --warmup at least 0")
    if not isinstance(model, nn.Module):
        from .loading import load_model

        model = load_model(model, pretrained=False)
    cfg = get_config(model)
    if cfg is None:
        raise EvitError("this model has no EViT layers: convert it first (evit convert / evit_cli.convert)")
    dev = resolve_device(device)
    adapter = adapters.get_adapter(model)
    img = adapter.img_size(model)
    evit = model.eval().to(dev)
    dense = dense_copy(evit).eval()
    models = {"dense": dense, "evit": evit}

    latency_reps = latency_reps or max(3 * reps, 10)
    result_models = {}
    for name, m in models.items():  # eager models: counting sees every op
        result_models[name] = {
            "gmacs": count_macs(m, img, dev) / 1e9,
            "params_m": count_params(m) / 1e6,
        }
    result_models["dense"]["tokens"] = [adapter.num_tokens(model)]
    result_models["evit"]["tokens"] = [adapter.num_tokens(model)] + measure_tokens(evit, img, dev)

    if compile:  # counted above on the eager models; timed below compiled
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        models = {name: torch.compile(m) for name, m in models.items()}
        warmup = max(warmup, 2)
    x = torch.randn(batch, 3, img, img, device=dev)
    x1 = x[:1].clone()
    total = 2 * (warmup + reps) + 2 * (warmup + latency_reps)
    from .progress import Progress

    with Progress(enabled=progress) as bar, bar.task("bench dense vs EViT", total, unit="passes") as advance:
        t_batch = time_side_by_side(models, x, warmup=warmup, reps=reps, amp=amp, advance=advance)
        t_one = time_side_by_side(models, x1, warmup=warmup, reps=latency_reps, amp=amp, advance=advance)
    for name in models:
        s = _summary(t_batch[name])
        result_models[name]["latency"] = s
        result_models[name]["images_per_s"] = batch / (s["median_ms"] / 1000)
        result_models[name]["latency_b1"] = _summary(t_one[name])

    d, e = result_models["dense"], result_models["evit"]
    src = getattr(model, "evit_source", {}) or {}
    return {
        "tool_version": __version__,
        "model": src.get("model", type(model).__name__),
        "evit": cfg.to_dict(),
        "img_size": img,
        "batch": batch,
        "device": dev.type,
        "device_name": describe_device(dev),
        "precision": (("fp16" if dev.type == "cuda" else "bf16") + " autocast" if amp else "fp32")
        + (", torch.compile" if compile else ", eager"),
        "torch": torch.__version__,
        "warmup": warmup,
        "reps": reps,
        "dense": d,
        "evit_model": e,
        "speedup": e["images_per_s"] / d["images_per_s"],
        "speedup_b1": d["latency_b1"]["median_ms"] / e["latency_b1"]["median_ms"],
        "mac_ratio": d["gmacs"] / e["gmacs"],
    }


def model_summary(model: nn.Module) -> dict:
    """What an EViT model does, without timing: layers, keep rates, tokens, counted GMACs."""
    cfg = get_config(model)
    adapter = adapters.get_adapter(model)
    img = adapter.img_size(model)
    device = next(model.parameters()).device
    dense_gmacs = count_macs(dense_copy(model), img, device) / 1e9
    evit_gmacs = count_macs(model, img, device) / 1e9
    src = getattr(model, "evit_source", {}) or {}
    return {
        "model": src.get("model", type(model).__name__),
        "img_size": img,
        "layers": list(cfg.layers),
        "keep_rates": list(cfg.keep_rates),
        "fuse": cfg.fuse,
        "tokens": [adapter.num_tokens(model)] + measure_tokens(model, img, device),
        "gmacs_dense": dense_gmacs,
        "gmacs_evit": evit_gmacs,
        "mac_ratio": dense_gmacs / evit_gmacs,
        "params_m": count_params(model) / 1e6,
    }
