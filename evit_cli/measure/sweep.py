"""Keep-rate sweeps: GMACs, throughput timed side by side and accuracy per keep rate, and their plot."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .. import adapters
from ..algorithm.state import model_state
from ..errors import EvitError
from ..io.datasets import ImageData
from ..io.images import BadImages
from ..model.convert import convert_module, dense_copy, get_config, reorganized_as
from ..model.macs import count_macs
from ..model.validate import non_negative_int, optional, positive_int
from ..utils.files import write_bytes
from .bench import median_times
from .evaluate import Evaluator, evit_model, load_eval_data, progress_of


def variants(model: nn.Module, keep_rates: list[float]) -> dict[str, nn.Module]:
    """The dense model and one EViT copy per keep rate (at the model's EViT layers)."""
    cfg = get_config(model)
    out = {"dense": dense_copy(model)}
    for r in keep_rates:
        m = copy.deepcopy(model)
        convert_module(m, keep_rate=r, layers=cfg.layers, **reorganized_as(cfg))
        out[f"{r:g}"] = m
    return out


def _check(keep_rates, batch: int, reps: int, limit, workers: int, dataset, skip_bad_images: bool) -> None:
    if not keep_rates:
        raise EvitError("no keep rates to sweep: give --keep-rates, e.g. 0.5,0.7,0.9")
    for r in keep_rates:
        if not 0 < r <= 1:
            raise EvitError(f"keep rate {r} is outside (0, 1]")
    positive_int("--batch", batch)
    positive_int("--reps", reps)
    optional(positive_int)("--limit", limit)
    non_negative_int("--workers", workers)
    if skip_bad_images and dataset is None:
        raise EvitError("--skip-bad-images is about the images of --dataset: give --dataset, or drop it")


def sweep(model: nn.Module | str | os.PathLike, keep_rates: list[float], *, dataset=None, split: str | None = None,
          batch: int = 64, reps: int = 5, warmup: int = 1, device: str = "cpu", limit: int | None = None,
          workers: int = 2, amp: bool = False, progress=None, skip_bad_images: bool = False) -> dict:
    """For each keep rate (at the model's EViT layers): GMACs, images/s and speedup over the dense
    model (all timed side by side, interleaved), and with ``dataset`` the fidelity and accuracy
    measures of :data:`~.metrics.COLUMNS` on its images (the same evaluator as :func:`evit_cli.evaluate`).

    ``model``: an EViT model, or an exported folder or name (its own layers). ``dataset``: a hub name,
    folder or parquet (``split``, else its validation split, else all of it), or data from
    :func:`~.evaluate.load_eval_data`; ``limit``: a seeded sample of that many images.
    ``skip_bad_images``: skip and count undecodable images (``skipped_images`` in the result). ``progress``: show the
    timing and evaluation on stderr (or on a given :class:`evit_cli.utils.progress.Progress`).
    Returns the report (``rows``: one per model; see :func:`evit_cli.measure.report.sweep_table`)."""
    _check(keep_rates, batch, reps, limit, workers, dataset, skip_bad_images)
    spec, model = model, evit_model(model)
    bad = BadImages(skip_bad_images)
    if dataset is not None and not isinstance(dataset, ImageData):  # a bad data set is refused before any timing
        dataset = load_eval_data(str(dataset), split)
    ev = Evaluator(model, dataset, bad_images=bad) if dataset is not None else None
    with progress_of(progress) as p:
        models = {k: m.to(device).eval() for k, m in variants(model, keep_rates).items()}
        img = adapters.get_adapter(model).img_size(model)
        x = torch.randn(batch, 3, img, img, device=device)
        with p.task(f"sweep: timing {len(models)} models", len(models) * (warmup + reps), unit="passes") as advance:
            med = median_times(models, x, warmup=warmup, reps=reps, amp=amp, advance=advance)
        measured = _measure(models, ev, p, batch=batch, workers=workers, limit=limit, device=device)
    rows = [_row(name, m, img, device, batch, med, measured) for name, m in models.items()]
    cfg = get_config(model)
    result = {"layers": list(cfg.layers), "fuse": cfg.fuse, "batch": batch, "img_size": img, "reps": reps,
              "rows": rows, "amp": amp, "images": next(iter(measured.values())).images if measured else 0,
              "model": _name(model, spec)}
    if skip_bad_images:
        result["skipped_images"] = bad.count
    return result


def _name(model: nn.Module, spec) -> str:
    """The name of the model swept: its source, else what it was loaded from, else its class."""
    fallback = type(model).__name__ if isinstance(spec, nn.Module) else str(spec)
    return (model_state(model).source or {}).get("model", fallback)


def _measure(models: dict, ev: Evaluator | None, p, *, batch, workers, limit, device) -> dict:
    """The evaluator's rows of every model against the dense one, when there is a data set."""
    if ev is None:
        return {}
    with p.task(f"sweep: accuracy of {len(models)} models", ev.size(limit), unit="images") as advance:
        return ev.run(models, batch_size=batch, workers=workers, limit=limit, device=device, progress=advance)


def _row(name: str, m: nn.Module, img: int, device, batch: int, med: dict, measured: dict) -> dict:
    row = {
        "keep_rate": 1.0 if name == "dense" else float(name),
        "model": "dense" if name == "dense" else "evit",
        "gmacs": count_macs(m, img, device) / 1e9,
        "images_per_s": batch / med[name],
        "speedup": med["dense"] / med[name],
    }
    if name in measured:
        row.update(measured[name].metrics())
    return row


def plot_sweep(result: dict, path: str | os.PathLike, title: str = "") -> Path:
    """The paper's trade-off figure: accuracy and throughput against GMACs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvitError("the plot needs matplotlib: pip install 'evit-cli[plot]'") from None

    rows = sorted((r for r in result["rows"] if r["model"] == "evit"), key=lambda r: r["gmacs"])
    dense = next(r for r in result["rows"] if r["model"] == "dense")
    # accuracy: top-1 with labels, else the agreement with the dense model (100% for itself)
    acc_key = next((k for k in ("top1", "agreement", "cosine") if rows and k in rows[0]), None)
    labels = {"top1": "top-1 (%)", "agreement": "agreement with dense (%)", "cosine": "cosine to dense"}
    dense = {**dense, "agreement": 100.0, "cosine": 1.0} if acc_key in ("agreement", "cosine") else dense
    has_acc = acc_key is not None
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    panels = [("images_per_s", "images/s")] + ([(acc_key, labels[acc_key])] if has_acc else [])
    for ax, (key, label) in zip(axes[0][::-1] if has_acc else axes[0], panels):
        ax.plot([r["gmacs"] for r in rows], [r[key] for r in rows], "o-", label="EViT")
        for r in rows:
            ax.annotate(f"{r['keep_rate']:g}", (r["gmacs"], r[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.plot([dense["gmacs"]], [dense[key]], "s", color="black", label="dense")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"EViT keep-rate sweep, layers {','.join(map(str, result['layers']))}")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())
