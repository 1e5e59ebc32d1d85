"""Dense vs EViT, side by side in one run: throughput, latency, MACs, tokens."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import adapters
from .._version import __version__
from ..algorithm.state import model_state
from ..errors import EvitError
from ..model import validate
from ..model.convert import dense_copy, get_config
from ..model.macs import count_macs
from ..utils.device import amp_dtype, autocast, describe_device, resolve_device, synchronize

# --------------------------------------------------------------------------- counting


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_tokens(model: nn.Module, img_size: int, device="cpu") -> list[int]:
    """Sequence length coming out of each EViT block, measured in a forward pass."""
    seen: list[int] = []

    def record(module, args, out):  # some layouts return (hidden_states, ...) from a layer
        seen.append(int((out[0] if isinstance(out, tuple) else out).shape[1]))

    hooks = [b.register_forward_hook(record) for b in adapters.evit_blocks(model)]
    try:
        with torch.no_grad():
            adapters.get_adapter(model).run(model, torch.randn(1, 3, img_size, img_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return seen


# --------------------------------------------------------------------------- timing


def _interleaved(names: list[str], run, *, warmup: int, reps: int, device: torch.device,
                 advance=None) -> dict[str, list[float]]:
    """Seconds of ``run(name)`` for each name, interleaved rep by rep (order reversed every other
    rep) so that drift hits all alike; the first ``warmup`` reps are not kept."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + reps):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(device)
            t0 = time.perf_counter()
            run(name)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            if advance:
                advance()
    return times


def time_side_by_side(models: dict[str, nn.Module], x: torch.Tensor, *, warmup: int, reps: int, amp: bool,
                      advance=None) -> dict[str, list[float]]:
    """Seconds per forward pass for each model, interleaved rep by rep."""
    with torch.inference_mode(), autocast(x.device, amp):
        return _interleaved(list(models), lambda name: _forward(models[name], x), warmup=warmup, reps=reps,
                            device=x.device, advance=advance)


def _forward(model, x: torch.Tensor):
    """One forward on images, through the model's adapter where it has one (an image-text model: its image
    tower), else the call itself (a compiled model, an ONNX session)."""
    adapter = model_state(model).adapter if isinstance(model, nn.Module) else None
    return adapter.run(model, x) if adapter is not None else model(x)


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


# SDPA backends, by the aten op each one dispatches to
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "fused (backend)",
}


class _AttentionOps(TorchDispatchMode):
    """Counts fused attention kernels, and softmaxes over square (N x N, N > 1) matrices: the math path."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = SDPA_KERNELS.get(name)
        if (kind is None and name in ("_softmax", "softmax") and args[0].dim() >= 2
                and args[0].shape[-1] == args[0].shape[-2] > 1):
            kind = "math (explicit N x N softmax)"
        if kind is not None:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


def attention_kernels(model: nn.Module, x: torch.Tensor, amp: bool = False) -> dict[str, int]:
    """Which attention kernels one forward pass on ``x`` ran, with how many calls each."""
    mode = _AttentionOps()
    with torch.no_grad(), autocast(x.device, amp), mode:  # inference_mode would hide the backend op
        adapters.get_adapter(model).run(model, x)
    return mode.counts


def _training_loss(output) -> torch.Tensor:
    """A scalar from any model output (logits, a distilled pair, a transformers output)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    for key in ("logits", "pooler_output", "image_embeds", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            output = value
            break
    return output.float().square().mean()


def time_training(models: dict[str, nn.Module], x: torch.Tensor, *, warmup: int, reps: int, amp: bool,
                  advance=None) -> dict[str, list[float]]:
    """Seconds per training step (forward, backward, AdamW step) of copies of ``models``, interleaved."""
    import copy

    copies = {name: copy.deepcopy(m).train() for name, m in models.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-9) for name, m in copies.items()}

    def step(name: str) -> None:
        with autocast(x.device, amp):
            loss = _training_loss(copies[name](x))
        loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)

    return _interleaved(list(copies), step, warmup=warmup, reps=reps, device=x.device, advance=advance)


def bench(
    model: nn.Module | str | os.PathLike,
    *,
    batch: int = 256,
    device: str = "cpu",
    amp: bool = False,
    compile: bool | str = False,
    train: bool = False,
    onnx: bool = False,
    warmup: int = 2,
    reps: int = 10,
    latency_reps: int | None = None,
    progress: bool = False,
    intermediates: tuple[int, ...] | None = None,
) -> dict:
    """Benchmark an EViT model against its dense original, in one run.

    ``model`` is an EViT model or anything :func:`evit_cli.load_model` takes.
    Returns the report as a dict (see :mod:`evit_cli.measure.report` to render it):
    images/s at ``batch``, latency per batch and at batch 1 (median, spread),
    GMACs per image, parameters, tokens after each EViT layer, the attention
    kernels each model ran, speedups. ``compile`` (True, or a torch.compile
    mode such as ``"reduce-overhead"`` for CUDA graphs) adds the same figures
    for both models compiled, timed beside the eager ones; ``train`` adds
    training-step throughput (forward, backward, AdamW step) at ``batch``; ``onnx`` adds both models
    exported to ONNX and timed in ONNX Runtime (CPU provider, torch's thread count), interleaved;
    ``intermediates`` (timm models: block indices) adds ``forward_intermediates`` (NCHW: backbone and restore).
    """
    if batch < 1:
        raise EvitError(f"--batch must be at least 1, got {batch}")
    if reps < 1 or warmup < 0:
        raise EvitError("--reps must be at least 1 and --warmup at least 0")
    evit, dev = _evit_model(model, device)
    _check_intermediates(evit, intermediates)
    validate.fits_in_memory("--batch", batch, evit, batch=batch, device=device)
    img = adapters.get_adapter(evit).img_size(evit)
    models = {"dense": dense_copy(evit).eval(), "evit": evit}
    x = torch.randn(batch, 3, img, img, device=dev)
    figures = {name: _static_figures(m, x[:1], amp) for name, m in models.items()}
    mode = compile_mode_of(compile)
    compiled = _compiled(models, mode) if mode else {}
    warmup = max(warmup, 2) if mode else warmup
    runs = _Runs(warmup, reps, latency_reps or max(3 * reps, 10), amp)
    t_batch, t_one, t_train = _time_all(models, compiled, x, runs, train=train, progress=progress)
    for name in models:
        figures[name].update(_timing(t_batch[name], t_one[name], batch))
    result = _report(evit, figures, batch=batch, dev=dev, amp=amp, mode=mode, warmup=warmup, reps=reps)
    if mode:
        result["compiled"] = _compiled_report(mode, {n: _timing(t_batch[n], t_one[n], batch) for n in compiled})
    if train:
        result["training"] = _training_report(t_train, batch)
    if onnx:
        result["onnxruntime"] = time_onnxruntime(evit, batch=batch, warmup=warmup, reps=reps,
                                                 latency_reps=runs.latency_reps, progress=progress)
    if intermediates:
        result["intermediates"] = time_intermediates(models, x, intermediates, runs, progress=progress)
    return result


def _check_intermediates(model: nn.Module, indices: tuple[int, ...] | None) -> None:
    if not indices:
        return
    adapter = adapters.get_adapter(model)
    if adapter.name != "timm" or not hasattr(model, "forward_intermediates"):
        raise EvitError(f"--intermediates times timm's forward_intermediates: {type(model).__name__} has none (a "
                        "transformers model's forward returns its restored maps already, which bench times)")
    depth = adapter.depth(model)
    for i in indices:
        if not 0 <= i < depth:
            raise EvitError(f"--intermediates {i} is out of range: the model has {depth} blocks, indexed 0 to "
                            f"{depth - 1} (as forward_intermediates takes them)")


def time_intermediates(models: dict[str, nn.Module], x: torch.Tensor, indices: tuple[int, ...], r: _Runs, *,
                       progress: bool = False) -> dict:
    """timm's ``forward_intermediates(output_fmt="NCHW")`` at block ``indices``: the backbone, and for the EViT
    model the restore of the full patch grid; dense and EViT interleaved, at the batch and at batch 1."""
    from ..utils.progress import Progress

    def run(xb: torch.Tensor):
        return lambda name: models[name].forward_intermediates(xb, indices=list(indices), output_fmt="NCHW",
                                                               intermediates_only=True)

    steps = len(models) * (2 * r.warmup + r.reps + r.latency_reps)
    with (Progress(enabled=progress) as bar, bar.task("forward_intermediates", steps, unit="passes") as advance,
          torch.inference_mode(), autocast(x.device, r.amp)):
        at_batch, at_one = (_interleaved(list(models), run(xb), warmup=r.warmup, reps=n, device=x.device,
                                         advance=advance)
                            for xb, n in ((x, r.reps), (x[:1].clone(), r.latency_reps)))
    d, e = (_timing(at_batch[k], at_one[k], x.shape[0]) for k in ("dense", "evit"))
    return {"indices": list(indices), "output_fmt": "NCHW", "dense": d, "evit_model": e, **_speedups(d, e)}


def time_onnxruntime(model: nn.Module, *, batch: int, warmup: int, reps: int, latency_reps: int,
                     threads: int | None = None, progress: bool = False) -> dict:
    """Dense and EViT exported to ONNX (each checked against PyTorch) and timed in ONNX Runtime's
    CPU provider with ``threads`` threads (default: torch's), interleaved, at ``batch`` and at 1."""
    import copy
    import tempfile
    from pathlib import Path

    from ..io.export import export, onnx_session
    from ..utils.progress import Progress

    evit = copy.deepcopy(model).cpu().eval()
    img = adapters.get_adapter(evit).img_size(evit)
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="evit-onnx-") as tmp:
        sessions = {}
        for name, m in (("dense", dense_copy(evit)), ("evit", evit)):
            export(m, "onnx", Path(tmp) / f"{name}.onnx", check_batches=(1,))
            sessions[name] = onnx_session(Path(tmp) / f"{name}.onnx", threads)
        x = torch.randn(batch, 3, img, img).numpy()
        steps = 2 * (2 * warmup + reps + latency_reps)
        with Progress(enabled=progress) as bar, bar.task("ONNX Runtime dense vs EViT", steps, unit="passes") as advance:
            at_batch, at_one = (
                _interleaved(list(sessions),
                             lambda k, xb=xb: sessions[k].run(None, {sessions[k].get_inputs()[0].name: xb}),
                             warmup=warmup, reps=n, device=torch.device("cpu"), advance=advance)
                for xb, n in ((x, reps), (x[:1].copy(), latency_reps)))
    import onnxruntime  # onnx_session has checked that it is installed

    d, e = (_timing(at_batch[k], at_one[k], batch) for k in ("dense", "evit"))
    return {"onnxruntime": onnxruntime.__version__, "provider": "CPUExecutionProvider", "threads": threads,
            "dense": d, "evit_model": e, **_speedups(d, e)}


def _evit_model(model, device: str) -> tuple[nn.Module, torch.device]:
    """The EViT model to time (loaded when a name or folder is given), in eval mode on ``device``."""
    if not isinstance(model, nn.Module):
        from ..io.loading import load_model

        model = load_model(model, pretrained=False)
    if get_config(model) is None:
        raise EvitError("this model has no EViT layers: convert it first (evit convert / evit_cli.convert)")
    dev = resolve_device(device)
    return model.eval().to(dev), dev


@dataclass(frozen=True)
class _Runs:
    warmup: int
    reps: int
    latency_reps: int
    amp: bool


def _time_all(models: dict, compiled: dict, x: torch.Tensor, r: _Runs, *, train: bool, progress: bool):
    """Seconds per pass at the batch and at batch 1 (eager and compiled side by side), and per
    training step when ``train``."""
    from ..utils.progress import Progress

    timed = {**models, **compiled}
    steps = len(timed) * ((r.warmup + r.reps) + (r.warmup + r.latency_reps)) + (2 * (r.warmup + r.reps) if train else 0)
    with Progress(enabled=progress) as bar, bar.task("bench dense vs EViT", steps, unit="passes") as advance:
        t_batch = time_side_by_side(timed, x, warmup=r.warmup, reps=r.reps, amp=r.amp, advance=advance)
        t_one = time_side_by_side(timed, x[:1].clone(), warmup=r.warmup, reps=r.latency_reps, amp=r.amp,
                                  advance=advance)
        t_train = time_training(models, x, warmup=r.warmup, reps=r.reps, amp=r.amp, advance=advance) if train else None
    return t_batch, t_one, t_train


def precision(dev: torch.device, amp: bool, mode: str | None) -> str:
    """The precision and execution the figures were taken in, in words."""
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype(dev)]
    return (f"{dtype} autocast" if amp else "fp32") + (f", eager and torch.compile (mode {mode})" if mode
                                                       else ", eager")


def _report(model: nn.Module, figures: dict, *, batch: int, dev: torch.device, amp: bool, mode: str | None,
            warmup: int, reps: int) -> dict:
    src = model_state(model).source or {}
    d, e = figures["dense"], figures["evit"]
    return {
        "tool_version": __version__,
        "model": src.get("model", type(model).__name__),
        "evit": get_config(model).to_dict(),
        "img_size": adapters.get_adapter(model).img_size(model),
        "batch": batch,
        "device": dev.type,
        "device_name": describe_device(dev),
        "precision": precision(dev, amp, mode),
        "torch": torch.__version__,
        "warmup": warmup,
        "reps": reps,
        "dense": d,
        "evit_model": e,
        **_speedups(d, e),
        "mac_ratio": d["gmacs"] / e["gmacs"],
    }


def _static_figures(model: nn.Module, x1: torch.Tensor, amp: bool) -> dict:
    """What needs no timing, on the eager model (counting sees every op): MACs, parameters, tokens, kernels."""
    adapter = adapters.get_adapter(model)
    img = x1.shape[-1]
    tokens = [adapter.num_tokens(model)] + (measure_tokens(model, img, x1.device) if get_config(model) else [])
    return {
        "gmacs": count_macs(model, img, x1.device) / 1e9,
        "params_m": count_params(model) / 1e6,
        "tokens": tokens,
        "attention_kernels": attention_kernels(model, x1, amp),
    }


def compile_mode_of(compile: bool | str) -> str | None:
    """The torch.compile mode asked for (True: "default"), None for eager; an unknown mode is refused."""
    if compile is True:
        return "default"
    if not compile:
        return None
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if compile not in modes:
        raise EvitError(f"unknown torch.compile mode {compile!r}: use one of {', '.join(modes)}")
    return compile


def _compiled(models: dict[str, nn.Module], mode: str) -> dict[str, nn.Module]:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return {f"{name} compiled": torch.compile(m, mode=mode) for name, m in models.items()}


def _timing(t_batch: list[float], t_one: list[float], batch: int) -> dict:
    s = _summary(t_batch)
    return {"latency": s, "images_per_s": batch / (s["median_ms"] / 1000), "latency_b1": _summary(t_one)}


def _speedups(d: dict, e: dict) -> dict:
    return {"speedup": e["images_per_s"] / d["images_per_s"],
            "speedup_b1": d["latency_b1"]["median_ms"] / e["latency_b1"]["median_ms"]}


def _compiled_report(mode: str, timings: dict) -> dict:
    d, e = timings["dense compiled"], timings["evit compiled"]
    return {"mode": mode, "dense": d, "evit_model": e, **_speedups(d, e)}


def _training_report(times: dict[str, list[float]], batch: int) -> dict:
    out = {}
    for name, key in (("dense", "dense"), ("evit", "evit_model")):
        s = _summary(times[name])
        out[key] = {"step": s, "images_per_s": batch / (s["median_ms"] / 1000)}
    out["speedup"] = out["evit_model"]["images_per_s"] / out["dense"]["images_per_s"]
    return out


def model_summary(model: nn.Module) -> dict:
    """What an EViT model does, without timing: layers, keep rates, tokens, counted GMACs."""
    cfg = get_config(model)
    adapter = adapters.get_adapter(model)
    img = adapter.img_size(model)
    device = next(model.parameters()).device
    dense_gmacs = count_macs(dense_copy(model), img, device) / 1e9
    evit_gmacs = count_macs(model, img, device) / 1e9
    src = model_state(model).source or {}
    return {
        "model": src.get("model", type(model).__name__),
        "img_size": img,
        "layers": list(cfg.layers),
        "keep_rates": list(cfg.keep_rates),
        "fuse": cfg.fuse,
        **({"method": cfg.method} if cfg.method != "evit" else {}),
        **({"score": cfg.score} if cfg.score != "cls" else {}),
        **({"restore": cfg.restore.text()} if cfg.restore is not None else {}),
        "tokens": [adapter.num_tokens(model)] + measure_tokens(model, img, device),
        "gmacs_dense": dense_gmacs,
        "gmacs_evit": evit_gmacs,
        "mac_ratio": dense_gmacs / evit_gmacs,
        "params_m": count_params(model) / 1e6,
    }
