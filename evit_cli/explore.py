"""The accuracy/speed trade-off: matching MACs at a higher resolution, evaluation,
keep-rate sweeps, searching for a target, and the inattentive-token visualization."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from . import adapters
from .bench import count_macs, median_times
from .core import convert, dense_copy, get_config
from .errors import EvitError

# --------------------------------------------------------------------------- MACs


def macs_at(model: nn.Module, keep_rate: float) -> int:
    """Counted MACs of ``model`` with every EViT layer at ``keep_rate``."""
    cfg = get_config(model)
    adapters.set_keep_rates(model, [keep_rate] * len(cfg.layers))
    try:
        return count_macs(model, adapters.get_adapter(model).img_size(model), next(model.parameters()).device)
    finally:
        adapters.set_keep_rates(model, cfg.keep_rates)


def largest_keep_rate_under(model: nn.Module, budget: float, step: float = 0.001) -> float:
    """The largest keep rate (multiple of ``step``) whose counted MACs stay within ``budget``.

    MACs never grow as the keep rate falls, so a bisection finds it.
    """
    lo, hi = 1, round(1 / step)  # in units of step
    if macs_at(model, hi * step) <= budget:
        return 1.0
    if macs_at(model, lo * step) > budget:
        raise EvitError(f"no keep rate meets {budget / 1e9:.3f} GMACs at these layers: choose earlier layers or a larger target")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs_at(model, mid * step) <= budget:
            lo = mid
        else:
            hi = mid
    return round(lo * step, 6)


def match_macs(model: nn.Module, reference_size: int, layers, fuse: bool = True) -> float:
    """Convert ``model`` (already at its new image size) with the keep rate whose counted MACs come
    closest to the dense model at ``reference_size`` px without exceeding them; returns the rate."""
    adapter = adapters.get_adapter(model)
    ref = dense_copy(model)
    adapter.set_img_size(ref, reference_size)
    budget = count_macs(ref, reference_size)
    convert(model, keep_rate=1.0, layers=layers, fuse=fuse)
    rate = largest_keep_rate_under(model, budget)
    convert(model, keep_rate=rate, layers=layers, fuse=fuse)
    return rate


# --------------------------------------------------------------------------- accuracy


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], data, *, reference: str = "dense", batch_size: int = 64,
                    workers: int = 2, limit: int | None = None, device="cpu", progress=None) -> dict[str, dict]:
    """Each model on the same images, against ``models[reference]`` (the dense model): agreement (%)
    and KL(dense || model) per image, or the embeddings' cosine similarity for a headless model;
    top-1/top-5 (%) when the data set has labels. A flat folder of images has none."""
    from .classes import eval_class_map
    from .data import make_loader, transforms, with_transform
    from .fidelity import Tally, outputs

    ref_model = models[reference]
    adapter = adapters.get_adapter(ref_model)
    embedding = adapter.num_classes(ref_model) == 0
    mapping = eval_class_map(data.class_names, ref_model) if data.labelled and not embedding else None
    ds = data.val
    if limit:
        ds = ds.shuffle(seed=0).select(range(min(limit, len(ds))))  # a seeded sample across classes
    label_column = None if embedding else data.label_column
    ds = with_transform(ds, data.image_column, label_column, transforms(adapter.data_config(ref_model), train=False),
                        label_map=mapping)
    tallies = {name: Tally(embedding) for name in models}
    for images, target in make_loader(ds, batch_size=batch_size, workers=workers):
        images, target = images.to(device), target.to(device)
        ref = outputs(ref_model, images)
        for name, m in models.items():
            out = ref if name == reference else outputs(m, images)
            tallies[name].add(out, None if name == reference else ref, target)
        if progress:
            progress(target.numel())
    if tallies[reference].sums["images"] == 0:
        raise EvitError("the evaluation split is empty")
    return {name: t.result() for name, t in tallies.items()}


# --------------------------------------------------------------------------- sweep and search


FIDELITY_KEYS = ("agreement", "kl", "cosine", "top1", "top5")


def variants(model: nn.Module, keep_rates: list[float]) -> dict[str, nn.Module]:
    """The dense model and one EViT copy per keep rate (at the model's EViT layers)."""
    cfg = get_config(model)
    out = {"dense": dense_copy(model)}
    for r in keep_rates:
        m = copy.deepcopy(model)
        convert(m, keep_rate=r, layers=cfg.layers, fuse=cfg.fuse)
        out[f"{r:g}"] = m
    return out


def sweep(model: nn.Module, keep_rates: list[float], *, data=None, batch: int = 64, reps: int = 5, warmup: int = 1,
          device: str = "cpu", limit: int | None = None, workers: int = 2, amp: bool = False, progress=None) -> dict:
    """GMACs, images/s and speedup (all timed side by side, interleaved), and accuracy when a data set is given.

    ``progress``: an :class:`evit_cli.progress.Progress` to show the timing and evaluation on."""
    from .progress import Progress

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
        from .data import sample_size

        with progress.task(f"sweep: accuracy of {len(models)} models", sample_size(data.val, limit),
                           unit="images") as advance:
            acc = evaluate_models(models, data, batch_size=batch, workers=workers, limit=limit, device=device,
                                  progress=advance)
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
    from .fsutil import write_bytes

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
            ax.annotate(f"{r['keep_rate']:g}", (r["gmacs"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
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


def candidate_layer_sets(depth: int) -> list[tuple[int, ...]]:
    """Sensible EViT layer sets for a model of ``depth`` blocks: the paper's 4,7,10 scaled to the
    depth, and evenly spaced sets of 2 to 4 layers that leave the first block alone."""
    sets = {tuple(sorted({max(2, min(depth, round(x * depth / 12))) for x in (4, 7, 10)}))}
    for n in (2, 3, 4):
        for start in (2, 3, 4):
            step = max(1, (depth - start) // n)
            s = tuple(start + i * step for i in range(n))
            if s[-1] <= depth:
                sets.add(s)
    return sorted(sets)


def search(model: nn.Module, *, target_gmacs: float | None = None, target_speedup: float | None = None,
           layer_sets: list[tuple[int, ...]] | None = None, batch: int = 64, reps: int = 3, device: str = "cpu",
           progress=None) -> dict:
    """The largest keep rate (and layer set) that meets a GMACs or a measured-speedup target.

    ``progress``: an :class:`evit_cli.progress.Progress` to show the candidates tried on."""
    from .progress import Progress
    from .validate import optional, positive

    if (target_gmacs is None) == (target_speedup is None):
        raise EvitError("give one target: --target-gmacs or --target-speedup")
    optional(positive)("--target-gmacs", target_gmacs)
    optional(positive)("--target-speedup", target_speedup)
    cfg = get_config(model)
    searched = bool(layer_sets)
    layer_sets = layer_sets or [cfg.layers]
    adapter = adapters.get_adapter(model)
    best = None
    for layers in (progress or Progress(enabled=False)).track(layer_sets, "search", unit="layer sets"):
        m = copy.deepcopy(model)
        convert(m, keep_rate=1.0, layers=layers, fuse=cfg.fuse)
        if target_gmacs is not None:
            try:
                rate = largest_keep_rate_under(m, target_gmacs * 1e9, step=0.01)
            except EvitError:
                continue
        else:
            rate = _search_speedup(m, target_speedup, batch=batch, reps=reps, device=device)
            if rate is None:
                continue
        if best is None or rate > best[0]:
            best = (rate, layers)
    if best is None:
        where = "at any of the layer sets tried" if searched else "at these layers"
        if target_gmacs is not None:
            advice = "raise the target or choose earlier layers" + ("" if searched else " (--search-layers tries other sets)")
            raise EvitError(f"no keep rate reaches {target_gmacs:g} GMACs {where}: {advice}")
        advice = "lower the target or choose earlier layers" + ("" if searched else " (--search-layers tries other sets)")
        raise EvitError(f"no keep rate reaches a {target_speedup:g}x speedup {where}: {advice}")
    rate, layers = best
    convert(model, keep_rate=rate, layers=layers, fuse=cfg.fuse)
    img = adapter.img_size(model)
    dense = dense_copy(model).to(device).eval()
    model.to(device).eval()
    x = torch.randn(batch, 3, img, img, device=device)
    med = median_times({"dense": dense, "evit": model}, x, reps=reps)
    return {
        "keep_rate": rate, "layers": list(layers), "fuse": cfg.fuse, "img_size": img,
        "gmacs": count_macs(model, img, device) / 1e9, "gmacs_dense": count_macs(dense, img, device) / 1e9,
        "speedup": med["dense"] / med["evit"], "images_per_s": batch / med["evit"], "batch": batch,
        "target_gmacs": target_gmacs, "target_speedup": target_speedup,
    }


def search_fidelity(model: nn.Module, data, *, limit: int, batch: int, workers: int, device) -> dict:
    """Agreement and KL with the dense model (and top-1 with labels) of a found setting, on ``limit`` images."""
    r = evaluate_models({"dense": dense_copy(model).to(device).eval(), "evit": model.to(device).eval()}, data,
                        batch_size=batch, workers=workers, limit=limit, device=device)
    return {**r["evit"], **({"top1_dense": r["dense"]["top1"]} if "top1" in r["dense"] else {})}


def _search_speedup(model, target: float, *, batch: int, reps: int, device: str) -> float | None:
    """Bisection over keep rates 0.05-1.0 (steps of 0.05) on the measured speedup."""
    img = adapters.get_adapter(model).img_size(model)
    dense = dense_copy(model).to(device).eval()
    model.to(device).eval()
    x = torch.randn(batch, 3, img, img, device=device)
    cfg = get_config(model)

    def speedup(rate: float) -> float:
        adapters.set_keep_rates(model, [rate] * len(cfg.layers))
        med = median_times({"dense": dense, "evit": model}, x, reps=reps)
        return med["dense"] / med["evit"]

    lo, hi = 1, 20  # in units of 0.05
    if speedup(lo * 0.05) < target:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if speedup(mid * 0.05) >= target:
            lo = mid
        else:
            hi = mid
    return round(lo * 0.05, 2)


# --------------------------------------------------------------------------- visualization

BLANK = (255, 0, 255)  # the colour of fused patches: magenta, rare in photos


def patch_fates(model: nn.Module, x: torch.Tensor) -> list[list[set[int]]]:
    """For each image, for each EViT layer: the patches that still have a token of their own after it."""
    adapter = adapters.get_adapter(model)
    num_patches = adapter.num_tokens(model) - adapter.num_prefix_tokens(model)
    adapters.record_kept(model, True)
    try:
        with torch.no_grad():
            model(x)
        kept = [b.evit.kept for b in adapters.evit_blocks(model)]
    finally:
        adapters.record_kept(model, False)
    fuse = get_config(model).fuse
    fates = []
    for i in range(x.shape[0]):
        tokens: list[int | None] = list(range(num_patches))  # None stands for a fused token
        per_layer = []
        for idx in kept:
            if idx is not None:
                tokens = [tokens[j] for j in idx[i].tolist()] + ([None] if fuse else [])
            per_layer.append({t for t in tokens if t is not None})
        fates.append(per_layer)
    return fates


def visualize(model: nn.Module, images: list[str | os.PathLike], out: str | os.PathLike, scale: int | None = None) -> dict:
    """One row per image: the image as the model sees it, then one panel per EViT layer with the
    patches that no longer have a token of their own (fused or dropped) blanked out."""
    from PIL import Image, ImageDraw

    from .data import open_image, transforms
    from .fsutil import write_bytes

    if get_config(model) is None:
        raise EvitError("this model has no EViT layers: convert it first")
    adapter = adapters.get_adapter(model)
    dc = adapter.data_config(model)
    tf = transforms(dc, train=False)
    pics, tensors = [], []
    for path in images:
        pic = open_image(str(path), hint="give a JPEG or PNG file")
        t = tf(pic)
        tensors.append(t)
        mean, std = torch.tensor(dc["mean"])[:, None, None], torch.tensor(dc["std"])[:, None, None]
        arr = ((t * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        pics.append(Image.fromarray(arr))
    fates = patch_fates(model, torch.stack(tensors).to(next(model.parameters()).device))
    img = adapter.img_size(model)
    num_patches = adapter.num_tokens(model) - adapter.num_prefix_tokens(model)
    grid = int(round(num_patches ** 0.5))
    patch = img // grid
    scale = scale or max(1, 224 // img)
    size, gap = img * scale, 4
    cfg = get_config(model)
    cols = 1 + len(cfg.layers)
    canvas = Image.new("RGB", (cols * size + (cols - 1) * gap, len(pics) * size + (len(pics) - 1) * gap), "white")
    counts = []
    for r, (pic, per_layer) in enumerate(zip(pics, fates)):
        y = r * (size + gap)
        canvas.paste(pic.resize((size, size), Image.NEAREST), (0, y))
        row = []
        for c, visible in enumerate(per_layer, start=1):
            panel = pic.copy()
            draw = ImageDraw.Draw(panel)
            for p in range(num_patches):
                if p not in visible:
                    py, px = divmod(p, grid)
                    draw.rectangle([px * patch, py * patch, (px + 1) * patch - 1, (py + 1) * patch - 1], fill=BLANK)
            canvas.paste(panel.resize((size, size), Image.NEAREST), (c * (size + gap), y))
            row.append(num_patches - len(visible))
        counts.append(row)
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes(out, buf.getvalue())
    return {"output": str(out), "layers": list(cfg.layers), "keep_rates": list(cfg.keep_rates),
            "patch_grid": grid, "panel_px": size, "blanked_patches": counts, "images": [str(p) for p in images]}
