"""Keep-rate sweeps: GMACs, throughput timed side by side and accuracy per keep rate, and their plot."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .. import adapters
from ..errors import EvitError
from ..io.data import sample_size
from ..model.convert import convert_module, dense_copy, get_config
from ..model.macs import count_macs
from ..utils.files import write_bytes
from ..utils.progress import Progress
from .bench import median_times
from .evaluate import evaluate_models

FIDELITY_KEYS = ("agreement", "kl", "cosine", "neighbour_overlap", "knn_top1", "top1", "top5")


def variants(model: nn.Module, keep_rates: list[float]) -> dict[str, nn.Module]:
    """The dense model and one EViT copy per keep rate (at the model's EViT layers)."""
    cfg = get_config(model)
    out = {"dense": dense_copy(model)}
    for r in keep_rates:
        m = copy.deepcopy(model)
        convert_module(m, keep_rate=r, layers=cfg.layers, fuse=cfg.fuse)
        out[f"{r:g}"] = m
    return out


def sweep(model: nn.Module, keep_rates: list[float], *, data=None, batch: int = 64, reps: int = 5, warmup: int = 1,
          device: str = "cpu", limit: int | None = None, workers: int = 2, amp: bool = False, progress=None,
          bad_images=None) -> dict:
    """GMACs, images/s and speedup (all timed side by side, interleaved), and accuracy when a data set is given.

    ``progress``: an :class:`evit_cli.utils.progress.Progress` to show the timing and evaluation on;
    ``bad_images``: a :class:`evit_cli.io.data.BadImages` (see :func:`evit_cli.measure.evaluate.evaluate_models`)."""

    if not keep_rates:
        raise EvitError("no keep rates to sweep: give --keep-rates, e.g. 0.5,0.7,0.9")
    for r in keep_rates:
        if not 0 < r <= 1:
            raise EvitError(f"keep rate {r} is outside (0, 1]")
    progress = progress or Progress(enabled=False)
    models = {k: m.to(device).eval() for k, m in variants(model, keep_rates).items()}
    img = adapters.get_adapter(model).img_size(model)
    x = torch.randn(batch, 3, img, img, device=device)
    with progress.task(f"sweep: timing {len(models)} models", len(models) * (warmup + reps), unit="passes") as advance:
        med = median_times(models, x, warmup=warmup, reps=reps, amp=amp, advance=advance)
    acc = {}
    if data:

        with progress.task(f"sweep: accuracy of {len(models)} models", sample_size(data.val, limit),
                           unit="images") as advance:
            acc = evaluate_models(models, data, batch_size=batch, workers=workers, limit=limit, device=device,
                                  progress=advance, bad_images=bad_images)
    rows = []
    for name, m in models.items():
        row = {
            "keep_rate": 1.0 if name == "dense" else float(name),
            "model": "dense" if name == "dense" else "evit",
            "gmacs": count_macs(m, img, device) / 1e9,
            "images_per_s": batch / med[name],
            "speedup": med["dense"] / med[name],
        }
        if name in acc:
            row.update({k: v for k, v in acc[name].items() if k in FIDELITY_KEYS})
        rows.append(row)
    cfg = get_config(model)
    return {"layers": list(cfg.layers), "fuse": cfg.fuse, "batch": batch, "img_size": img, "reps": reps, "rows": rows,
            "amp": amp,
            "images": next(iter(acc.values()))["images"] if acc else 0}


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
