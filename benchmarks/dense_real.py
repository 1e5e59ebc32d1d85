"""Dense prediction: how close EViT's full patch-grid maps stay to the dense model's, per restore strategy.

Behind the figures of docs/dense.md and the choice of the default restore (``evit_cli/algorithm/restore.py``).
DeiT-Tiny (../shared/real weights) on every photo of ../shared/real/imagenette-val (3925, sorted by path;
--limit N takes N evenly spaced), timm's eval preprocessing. For each restore strategy (``fused``: today's
fill with the fused token; ``reconstruct``: Liang et al. NeurIPS 2022's reconstruction from the kept
tokens, softmax over cosine similarity at temperature T; ``delta``: the removed token's own value plus
what its similar kept tokens changed since) and each keep rate (0.5 to 0.9 at 4,7,10), with the paper's
method, and with the ``squeeze`` method (each removed token averaged into its most similar kept one) for
the strategies of --squeeze-restores:

- per-patch cosine between the NCHW maps of ``forward_intermediates`` and the dense model's, at blocks
  3, 6, 9 and 12: mean, median, 10th percentile and the share below 0.9; the block-12 mean on each half
  of the classes (the first five synsets and the last five), the check that a choice holds on both;
- a segmentation proxy: k-means (k = 8, fitted per photo on the dense block-12 map, 20 Lloyd steps
  from 8 evenly spaced patches), the share of patches of the restored block-12 map given the same
  cluster as the dense map's;
- counted GMACs of the backbone (``evit_cli.model.macs.count_macs``) plus the restore's own MACs;
- the measured speed of backbone + restore on DeiT-Small (random weights, fp32) against the dense
  backbone, both through ``forward_intermediates(indices=[2, 5, 8, 11], output_fmt="NCHW")``, at batch 64
  and at batch 1 (20 calls), timed in turn in one process, median of --reps (the default strategy at
  every keep rate and every strategy at 0.7; --no-speed skips it).

Writes OUT/dense_real.{json,md} and OUT/dense_real.png (the dense block-12 map and each strategy's
restored map at keep 0.7, PCA to RGB, for a few photos). On the project's 2-core CPU, idle, the 20
settings on all 3925 photos take about 20 minutes, plus about 10 minutes of timing at --reps 5.

    python benchmarks/dense_real.py --out benchmarks/results
    python benchmarks/dense_real.py --speed-only --out benchmarks/results  # time a --no-speed run again
    python benchmarks/dense_real.py --limit 64 --no-speed --out /tmp/d  # smoke
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when run from elsewhere
import _common as c  # noqa: E402

STEM = "dense_real"
SPEED_MODEL = "deit_small_patch16_224"
TAPS = [2, 5, 8, 11]  # blocks 3, 6, 9, 12
CROP = 224


def parse_args(argv):
    ap = c.Parser(__doc__)
    ap.add_argument("--limit", type=int, default=None, help="Photos, evenly spaced. [all 3925]")
    ap.add_argument("--layers", default="4,7,10", help="1-based EViT layers. [4,7,10]")
    ap.add_argument("--keeps", default="0.5,0.6,0.7,0.8,0.9", help="Keep rates. [0.5,...,0.9]")
    ap.add_argument("--restores", default=None,
                    help="Strategies as NAME or NAME:TEMPERATURE[:TOPK], comma-separated. [fused, reconstruct "
                         "and delta at the default temperature]")
    ap.add_argument("--squeeze-restores", default="delta",
                    help="The strategies measured with the squeeze method too, as --restores ('' for none). [delta]")
    ap.add_argument("--batch", type=int, default=64, help="Photos per forward. [64]")
    c.add_speed_options(ap, STEM)
    ap.add_argument("--figure-photos", type=int, default=4, help="Photos in the figure. [4]")
    ap.add_argument("--out", default=str(c.RESULTS), help="Folder of the result files. [benchmarks/results]")
    args = ap.parse_args(argv)
    c.check_args(ap, args, counts=("limit", "batch", "reps"))
    try:
        args.keep_list = [float(k) for k in args.keeps.split(",")]
        args.specs = restore_specs(args.restores)
        args.squeeze_specs = restore_specs(args.squeeze_restores) if args.squeeze_restores else []
    except ValueError as e:
        ap.error(f"--keeps/--restores: {e}")
    return args


def restore_specs(text: str | None) -> list:
    from evit_cli.algorithm.restore import STRATEGIES, RestoreSpec

    if not text:
        return [RestoreSpec(s) for s in STRATEGIES]
    out = []
    for part in text.split(","):
        name, *rest = part.split(":")
        out.append(RestoreSpec(name, *([float(rest[0])] if rest else []), *([int(rest[1])] if len(rest) > 1 else [])))
    return out


def label(spec, method: str = "evit") -> str:
    from evit_cli.algorithm.restore import RestoreSpec

    how = "squeeze + " if method == "squeeze" else ""
    if spec.strategy == "fused":
        return how + "fused"
    extra = f", top {spec.top_k}" if spec.top_k else ""
    default = " (default)" if spec == RestoreSpec() and method == "evit" else ""
    return f"{how}{spec.strategy} T={spec.temperature:g}{extra}{default}"


def build(model, keep: float, layers: list[int], spec, method: str = "evit"):
    import evit_cli
    from evit_cli.algorithm.state import model_state

    m = evit_cli.convert(copy.deepcopy(model), keep_rate=keep, layers=tuple(layers), method=method)
    model_state(m).positions.restore_with = spec
    return m.eval()


def maps(model, x):
    """(B, C, H, W) maps at TAPS as (taps, B, P, C), float32."""
    import torch

    with torch.inference_mode():
        out = model.forward_intermediates(x, indices=TAPS, output_fmt="NCHW", intermediates_only=True)
    return torch.stack([m.flatten(2).transpose(1, 2).float() for m in out])


def kmeans(points, k: int = 8, steps: int = 20):
    """Per photo Lloyd's k-means on (B, P, C), from k evenly spaced patches: the centroids (B, k, C)."""
    import torch

    idx = torch.linspace(0, points.shape[1] - 1, k).long()
    cent = points[:, idx].clone()
    for _ in range(steps):
        assign = torch.cdist(points, cent).argmin(-1)
        one = torch.nn.functional.one_hot(assign, k).to(points.dtype)  # (B, P, k)
        counts = one.sum(1)[..., None]
        cent = torch.where(counts > 0, one.transpose(1, 2) @ points / counts.clamp_min(1), cent)
    return cent


def restore_macs(model, layers: list[int], spec, method: str = "evit") -> int:
    """MACs of the restore on one image, from the token counts: each step's similarity (r x k x C) and
    matrix update (P x r x cols), the offset update of ``delta`` (P x r x C + r x cols x C, and with the
    squeeze method the kept tokens' change, P x k x C), and at each tap after a reorganization
    ``matrix @ tokens`` (P x M x C)."""
    from evit_cli import tokens_after_layers

    p, ch, prefix = model.patch_embed.num_patches, model.embed_dim, model.num_prefix_tokens
    counts = [n - prefix for n in tokens_after_layers(model)]  # candidates after each EViT layer
    total, m = 0, p
    for cols in counts:
        k = cols - 1 if method == "evit" else cols  # the fused token is the last (squeeze makes none)
        r = m - k
        if spec.strategy != "fused":
            total += r * k * ch
        total += p * r * cols
        if spec.strategy == "delta":
            total += r * cols * ch + p * r * ch + (p * k * ch if method == "squeeze" else 0)
        m = cols
    for t in TAPS:
        after = [n for layer, n in zip(layers, counts) if layer - 1 <= t]
        total += p * after[-1] * ch if after else 0
    return total


def speed(spec, keep: float, layers: list[int], dense, reps: int, method: str = "evit") -> dict:
    """Backbone + restore against the dense backbone, both through NCHW ``forward_intermediates`` at TAPS."""
    def nchw(m):
        return lambda x: m.forward_intermediates(x, indices=TAPS, output_fmt="NCHW", intermediates_only=True)

    return c.side_by_side(nchw(dense), nchw(build(dense, keep, layers, spec, method)), reps, CROP)


def timed_here(spec, keep: float) -> bool:
    """The rows timed: the default strategy at every keep rate (with either method), every strategy at 0.7."""
    from evit_cli.algorithm.restore import RestoreSpec

    return spec == RestoreSpec() or keep == 0.7


def retime(args) -> dict:
    """--speed-only: the speedups of the timed rows of an earlier run measured again, the rest kept."""
    import timm

    from evit_cli.algorithm.restore import RestoreSpec

    small = timm.create_model(SPEED_MODEL, pretrained=False, num_classes=0).eval()

    def time_row(row, r):
        spec, method = RestoreSpec(row["strategy"], row["temperature"], row["top_k"]), row.get("method", "evit")
        timed = timed_here(spec, row["keep"])
        return speed(spec, row["keep"], r["layers"], small, args.reps, method) if timed else None

    r = c.retime(args, __file__, STEM, time_row, markdown)
    r["speed_model"] = SPEED_MODEL
    c.write_results(Path(args.out), STEM, r, markdown(r))
    return r


# --------------------------------------------------------------------------- scoring


def cosines(model_maps, dense_maps):
    """Per-patch cosine (taps, B, P)."""
    import torch.nn.functional as F

    return F.cosine_similarity(model_maps, dense_maps, dim=-1)


def summary(cos) -> dict:
    """Mean, median, 10th percentile and share below 0.9 of a flat tensor of cosines."""
    import torch

    cos = cos.flatten().float()
    q = torch.quantile(cos[torch.randperm(cos.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]],
                       torch.tensor([0.1, 0.5]))
    return {"mean": round(float(cos.mean()), 4), "median": round(float(q[1]), 4), "p10": round(float(q[0]), 4),
            "below_0.9": round(float((cos < 0.9).float().mean()), 4)}


def run(args) -> dict:
    import timm
    import torch

    from evit_cli.model.macs import count_macs

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    paths = c.photos()
    idx = c.spread(list(range(len(paths))), args.limit)
    dense = c.dense_model(headless=True)
    settings = [(m, spec, keep) for m, specs in (("evit", args.specs), ("squeeze", args.squeeze_specs))
                for spec in specs for keep in args.keep_list]
    models = {(m, spec, keep): build(dense, keep, args.layer_list, spec, m) for m, spec, keep in settings}
    second_half = torch.tensor(c.class_numbers(paths, idx)) >= 5
    prog = c.Progress(len(idx) * (1 + len(settings)))
    cos = {s: [] for s in settings}
    agree = {s: [] for s in settings}
    shown = {}
    for n, x in enumerate(c.image_batches(paths, idx, dense, batch=args.batch)):
        ref = maps(dense, x)
        cent = kmeans(ref[-1])
        ref_assign = torch.cdist(ref[-1], cent).argmin(-1)
        if n == 0:
            shown["dense"] = ref[-1][: args.figure_photos]
            shown["images"] = x[: args.figure_photos]
        for s in settings:
            got = maps(models[s], x)
            cos[s].append(cosines(got, ref).half())
            agree[s].append((torch.cdist(got[-1], cent).argmin(-1) == ref_assign).float().mean(1))
            if n == 0 and s[2] == 0.7:
                shown[label(s[1], s[0])] = got[-1][: args.figure_photos]
        prog.step(f"batch {n + 1}: {len(x)} photos", len(x) * (1 + len(settings)))
    backbone = count_macs(dense, CROP)
    r = {"rows": [], "machine": c.machine(), "command": c.command(__file__), "images": len(idx),
         "torch": torch.__version__, "timm": timm.__version__, "layers": args.layer_list, "taps": [t + 1 for t in TAPS],
         "dense_gmacs": round(backbone / 1e9, 4), "speed_model": None if args.no_speed else SPEED_MODEL,
         "reps": args.reps}
    small = None if args.no_speed else timm.create_model(SPEED_MODEL, pretrained=False, num_classes=0).eval()
    for method, spec, keep in settings:
        model, s = models[(method, spec, keep)], (method, spec, keep)
        all_cos = torch.cat(cos[s], dim=1)  # (taps, photos, P)
        extra = restore_macs(model, args.layer_list, spec, method)
        row = {"restore": label(spec, method), "method": method, "strategy": spec.strategy,
               "temperature": spec.temperature, "top_k": spec.top_k, "keep": keep,
               "gmacs": round((count_macs(model, CROP) + extra) / 1e9, 4), "restore_gmacs": round(extra / 1e9, 5),
               "blocks": {str(t + 1): summary(all_cos[i]) for i, t in enumerate(TAPS)},
               "block12_by_class_half": [round(float(all_cos[-1][h].float().mean()), 4)
                                         for h in (~second_half, second_half)],
               "kmeans_agreement": round(float(torch.cat(agree[s]).mean()), 4),
               "speedup_b64": None, "speedup_b1": None}
        if small is not None and timed_here(spec, keep):
            row.update(speed(spec, keep, args.layer_list, small, args.reps, method))
        r["rows"].append(row)
        c.write_results(out, STEM, r, markdown(r))
    try:
        figure(shown, out / f"{STEM}.png", len(idx))
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
    return r


# --------------------------------------------------------------------------- output


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(r: dict) -> str:
    taps = [str(t) for t in r["taps"]]
    lines = [f"# Dense maps after EViT: restore strategies (DeiT-Tiny, {r['images']} photos)", "",
             f"`{r['command']}`", "", f"Machine: {r['machine']}; torch {r['torch']}, timm {r['timm']}. "
             f"EViT layers {','.join(map(str, r['layers']))}; dense backbone {r['dense_gmacs']} GMACs. "
             "Per-patch cosine to the dense model's NCHW maps: mean / median / p10 / share below 0.9, at each "
             "block; the block-12 mean on each half of the classes (first five / last five); k-means (k = 8) "
             "agreement at block 12; speedup of backbone + restore on "
             f"{r['speed_model'] or 'DeiT-Small (not timed)'} at batch 64 / 1.", "",
             "| restore | keep | GMACs | " + " | ".join(f"block {t}" for t in taps)
             + " | block 12 by half | k-means agr. | speedup b64 / b1 |",
             "|---|---|---|" + "---|" * len(taps) + "---|---|---|"]
    for x in r["rows"]:
        cells = [f"{b['mean']:.3f} / {b['median']:.3f} / {b['p10']:.3f} / {100 * b['below_0.9']:.0f}%"
                 for b in (x["blocks"][t] for t in taps)]
        halves = " / ".join(f"{h:.3f}" for h in x["block12_by_class_half"]) if "block12_by_class_half" in x else "-"
        lines.append(f"| {x['restore']} | {x['keep']} | {x['gmacs']:.3f} | " + " | ".join(cells)
                     + f" | {halves} | {100 * x['kmeans_agreement']:.1f}% | {fmt(x['speedup_b64'], '.2f')} / "
                     f"{fmt(x['speedup_b1'], '.2f')} |")
    return "\n".join(lines + ["", *c.timing_note(r), ""])


def figure(shown: dict, path: Path, photos: int) -> None:
    """Each photo, its dense block-12 map and each restored one (keep 0.7), PCA to RGB (fitted on the dense map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    names = [k for k in shown if k not in ("images",)]
    n = shown["dense"].shape[0]
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(2.2 * (len(names) + 1), 2.2 * n), squeeze=False)
    side = int(round(shown["dense"].shape[1] ** 0.5))
    for i in range(n):
        img = shown["images"][i].permute(1, 2, 0)
        axes[i][0].imshow(((img - img.min()) / (img.max() - img.min())).numpy())
        d = shown["dense"][i]
        mean = d.mean(0)
        _, _, v = torch.pca_lowrank(d - mean, q=3, center=False)
        proj = (d - mean) @ v
        lo, hi = proj.min(0).values, proj.max(0).values
        for j, name in enumerate(names):
            rgb = (((shown[name][i] - mean) @ v - lo) / (hi - lo)).clamp(0, 1).reshape(side, side, 3)
            axes[i][j + 1].imshow(rgb.numpy())
            if i == 0:
                axes[i][j + 1].set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"Block-12 maps, PCA to RGB, keep 0.7 ({photos} photos measured)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    return c.run_script(f"{STEM}.py", parse_args, lambda a: retime(a) if a.speed_only else run(a), markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
