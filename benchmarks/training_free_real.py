"""Training-free token reduction on the real photos: the paper's EViT, the squeeze and a ToMe reference.

Reproduces the table of docs/algorithm.md, "The squeeze method" ("Measured, training-free"), and the
curves for a docs/benchmarks.md section on training-free reduction, from
benchmarks/results/training_free_real.{json,md,png}. On the project's 2-core CPU machine a full run
takes about 3 to 5 minutes per setting (17 settings: about an hour): 1.5 to 4 minutes for the 3925
photos on DeiT-Tiny, about 1.5 minutes for the DeiT-Small timing at the default --reps 5 (--no-speed
skips it), plus 2 minutes to decode the photos once.

DeiT-Tiny (../shared/real weights) on every photo of ../shared/real/imagenette-val (3925, sorted by
path; --limit N takes N evenly spaced), preprocessed as the squeeze was measured: PIL bicubic resize
of the shorter side to 256, centre crop 224, ImageNet mean and std. For each setting:

- 1000-way top-1, agreement with the dense model's top-1 and mean KL(dense || model), on all photos
  and on each half: the first five synsets (sorted names) and the last five;
- counted GMACs of the DeiT-Tiny model (`evit_cli.model.macs.count_macs`);
- the measured speedup of the same setting on DeiT-Small (timm deit_small_patch16_224, random
  weights, fp32, CPU) at batch 64 and at batch 1 (each repetition one batch-64 call, or 20 batch-1
  calls, of the dense model then the reduced one, in one process; median of --reps);
- the headless model (num_classes=0, the class-token embedding after the final norm): cosine to the
  dense embedding and the overlap of each photo's 10 nearest neighbours with the dense embedding's
  (`evit_cli.measure.fidelity`). The embedding is the classifier head's input, taken in the same
  pass; each row checks it against a num_classes=0 model on the first batch (headless.check_max_diff).

Settings: the paper's EViT (`evit_cli.convert(model, keep_rate, layers)`: 0.5 to 0.9 at 4,7,10, and
0.75 at 3,6,9); the squeeze (`method="squeeze"`: 0.705 at 4,7,10, 0.861 at 4..12, and 0.9, 0.813, 0.8 (the
recommended setting) and 0.75 at 5..12); ToMe's bipartite soft matching (Bolya et al., "Token
Merging: Your ViT But Faster", ICLR 2023) as a reference, written here on timm's blocks: in every
block, between the attention and the MLP, the r most similar pairs (head-averaged keys, cosine)
between alternate tokens merged by a size-weighted average, the class token never merged, and
proportional attention (log size added to every key's logits) after the first merge.

    python benchmarks/training_free_real.py --out benchmarks/results

Timing wants a quiet machine; the accuracy does not. On a busy one, measure the accuracy first, then
time the same rows again once the machine is quiet (about 1.5 minutes a row):

    python benchmarks/training_free_real.py --no-speed --out benchmarks/results
    python benchmarks/training_free_real.py --speed-only --out benchmarks/results
    python benchmarks/training_free_real.py --limit 32 --reps 1 --no-speed --threads 1 --out /tmp/t  # smoke
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when run from elsewhere
import _common as c  # noqa: E402

STEM = "training_free_real"
SPEED_MODEL = "deit_small_patch16_224"
METHODS = ("dense", "evit", "squeeze", "tome")
PAPER_LAYERS = [4, 7, 10]
RECOMMENDED = (0.8, list(range(5, 13)))
EVIT = [(rate, PAPER_LAYERS) for rate in (0.5, 0.6, 0.7, 0.8, 0.9)] + [(0.75, [3, 6, 9])]
SQUEEZE = [(0.705, PAPER_LAYERS), (0.861, list(range(4, 13))), (0.9, list(range(5, 13))), (0.813, list(range(5, 13))),
           RECOMMENDED, (0.75, list(range(5, 13)))]
TOME_R = (8, 11, 13, 16)
RESIZE, CROP = 256, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv):
    ap = c.Parser(__doc__)
    ap.add_argument("--limit", type=int, default=None, help="At most N photos, evenly spaced (all: 3925).")
    c.add_speed_options(ap, STEM)
    ap.add_argument("--methods", default=",".join(METHODS[1:]),
                    help="Which of evit,squeeze,tome to run (the dense model always runs). [evit,squeeze,tome]")
    ap.add_argument("--batch", type=int, default=64, help="Batch size of the DeiT-Tiny passes. [64]")
    ap.add_argument("--out", default=str(c.RESULTS), help=f"Folder for {STEM}.{{json,md,png}}.")
    args = ap.parse_args(argv)
    c.check_args(ap, args, ("limit", "reps", "batch", "threads"))
    args.method_list = [m for m in args.methods.split(",") if m]
    if not args.method_list or any(m not in METHODS[1:] for m in args.method_list):
        ap.error(f"--methods {args.methods!r}: expected some of evit,squeeze,tome, comma-separated")
    return args


# --------------------------------------------------------------------------- the settings


def layer_text(layers: list[int]) -> str:
    """[4, 7, 10] -> '4,7,10'; a run of consecutive layers as '5,6,…,12'."""
    if len(layers) >= 4 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]},{layers[1]},…,{layers[-1]}"
    return ",".join(map(str, layers))


def settings(methods: list[str]) -> list[dict]:
    """One spec per row: method, settings (as the table shows it), convert (evit_cli.convert's keywords),
    tome_r, recommended."""
    specs = [{"method": "dense", "settings": "dense", "convert": None, "recommended": False}]
    for method, rows in (("evit", EVIT), ("squeeze", SQUEEZE)):
        if method in methods:
            specs += [{"method": method, "settings": f"{rate:g} at {layer_text(layers)}",
                       "convert": {"keep_rate": rate, "layers": list(layers), "method": method},
                       "recommended": method == "squeeze" and (rate, layers) == RECOMMENDED}
                      for rate, layers in rows]
    if "tome" in methods:
        specs += [{"method": "tome", "settings": f"r = {r} in every block", "convert": None, "tome_r": r,
                   "recommended": False} for r in TOME_R]
    return specs


def build(spec: dict, model):
    """``model`` (a dense timm ViT) reduced as ``spec`` says."""
    import evit_cli

    if spec["convert"] is not None:
        return evit_cli.convert(model, **spec["convert"])
    if spec["method"] == "tome":
        return tome_model(model, spec["tome_r"])
    return model


# --------------------------------------------------------------------------- ToMe (the reference)


def bipartite_merge(x, size, metric, r: int):
    """ToMe's bipartite soft matching on tokens ``x`` (B, N, C) holding ``size`` (B, N) patches, the class
    token first: the r edges of largest cosine similarity (``metric``, B, N, d) from the tokens at even
    positions to those at odd positions are merged by a size-weighted average; the class token (position 0)
    is never merged and stays first. Returns the merged tokens and their sizes."""
    import torch

    r = min(r, (x.shape[1] - 1) // 2)
    if r <= 0:
        return x, size
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        scores[:, 0, :] = -math.inf  # the class token
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # unmerged, in order: the class token first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
    weighted = torch.cat([x * size[..., None], size[..., None]], dim=-1)
    src, dst = weighted[:, ::2], weighted[:, 1::2]
    width = weighted.shape[-1]
    unm = src.gather(1, unm_idx.expand(-1, -1, width))
    moved = src.gather(1, src_idx.expand(-1, -1, width))
    dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, width), moved, reduce="sum")
    out = torch.cat([unm, dst], dim=1)
    return out[..., :-1] / out[..., -1:], out[..., -1]


def tome_block(blk, x, size, r: int):
    """One timm ViT block with ToMe: attention (with proportional attention once tokens hold more than one
    patch), the merge, then the MLP. Returns the tokens and their sizes."""
    import torch
    import torch.nn.functional as F

    a = blk.attn
    b, n, _ = x.shape
    q, k, v = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :].to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    o = a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(b, n, -1))))
    x = x + blk.drop_path1(blk.ls1(o))
    if size is None:
        size = torch.ones(b, n, dtype=x.dtype, device=x.device)
    x, size = bipartite_merge(x, size, k.mean(dim=1), r)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), size


def tome_model(vit, r: int):
    """A module running the timm VisionTransformer ``vit`` with ToMe at ``r`` in every block."""
    from torch import nn

    if getattr(vit, "num_prefix_tokens", None) != 1 or getattr(vit, "global_pool", None) != "token":
        raise RuntimeError("the ToMe reference takes a timm ViT with one class token and token pooling")
    if any(getattr(blk.attn, "gate", None) is not None for blk in vit.blocks):
        raise RuntimeError("the ToMe reference takes plain timm attention (no gate)")

    class ToMe(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit, self.r = vit, r

        def get_classifier(self):
            return self.vit.get_classifier()

        def forward(self, images):
            m = self.vit
            x, size = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images)))), None
            for blk in m.blocks:
                x, size = tome_block(blk, x, size, self.r)
            return m.forward_head(m.norm(x))

    return ToMe().eval()


# --------------------------------------------------------------------------- photos


def load_photo(path: Path):
    """One photo as uint8 (3, 224, 224): PIL bicubic resize of the shorter side to 256, centre crop 224."""
    import numpy as np
    import torch
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    scale = RESIZE / min(w, h)
    im = im.resize((max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - CROP) // 2, (h - CROP) // 2
    im = im.crop((left, top, left + CROP, top + CROP))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def normalize(u8):
    """uint8 photos (B, 3, H, W) -> float32 with the ImageNet mean and std."""
    import torch

    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return (u8.float() - mean) / std


def run_model(model, images, batch: int):
    """Logits and embeddings (the classifier head's input: the headless model's output) of every photo."""
    import torch

    logits, embs = [], []
    hook = model.get_classifier().register_forward_pre_hook(lambda _m, args: embs.append(args[0].float()))
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                logits.append(model(normalize(images[s:s + batch])).float())
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(embs)


# --------------------------------------------------------------------------- measures


def headless(spec: dict, emb, dense_emb, targets, first) -> dict:
    """Cosine and 10-NN overlap of the embeddings with the dense ones (and kNN top-1 over the 10 classes);
    check_max_diff: the largest difference between the embedding of the first batch and the output of a
    num_classes=0 model reduced the same way."""
    import torch

    from evit_cli.measure.fidelity import Tally

    tally = Tally(embedding=True)
    tally.add(emb, dense_emb, targets)
    r = tally.result()
    with torch.inference_mode():
        alone = build(spec, c.dense_model(headless=True))(normalize(first)).float()
    return {"cosine": r["cosine"], "overlap": r.get("neighbour_overlap"), "knn_top1": r.get("knn_top1"),
            "check_max_diff": float((alone - emb[:len(first)]).abs().max())}


def scores(logits, dense_logits, labels, classes) -> dict:
    """Top-1, agreement and KL on all photos and on each half of the synsets."""
    import torch

    def part(mask):
        if not bool(mask.any()):
            return None
        s = c.score(logits, dense_logits, labels, mask)
        return {key: s[key] for key in ("top1", "agreement", "kl", "photos")}

    everything = part(torch.ones(len(labels), dtype=torch.bool))
    return {"top1": everything["top1"], "agreement": everything["agreement"], "kl": everything["kl"],
            "first5": part(classes < 5), "last5": part(classes >= 5)}


def speed(spec: dict, dense, reps: int) -> dict:
    """Speedup of ``spec`` on DeiT-Small at batch 64 and 1 against ``dense`` (``_common.side_by_side``)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = build(spec, timm.create_model(SPEED_MODEL, pretrained=False).eval())
    return c.side_by_side(dense, model, reps, CROP)


def measure(spec: dict, images, ref: dict, args) -> dict:
    """One row: the DeiT-Tiny figures on every photo, the headless figures and the DeiT-Small speedups."""
    from evit_cli.model.macs import count_macs

    model = build(spec, c.dense_model())
    t0 = time.perf_counter()
    logits, emb = run_model(model, images, args.batch)
    row = {**spec, "gmacs": round(count_macs(model, CROP) / 1e9, 4),
           **scores(logits, ref["logits"], ref["labels"], ref["classes"])}
    row["headless"] = headless(spec, emb, ref["emb"], ref["classes"], images[:args.batch])
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    if spec["method"] == "dense":
        row.update(speedup_b64=1.0, speedup_b1=1.0)
    elif args.no_speed:
        row.update(speedup_b64=None, speedup_b1=None)
    else:
        row.update(speed(spec, ref["small"], args.reps))
    return row


# --------------------------------------------------------------------------- results


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def half_text(s: dict | None) -> str:
    return "-" if s is None else f"{s['top1']:.2f} / {s['agreement']:.1f} / {s['kl']:.3f} ({s['photos']})"


def markdown(r: dict) -> str:
    lines = [f"# Training-free token reduction (benchmarks/{STEM}.py)", "",
             f"DeiT-Tiny (../shared/real) on {r['images']} Imagenette photos of ImageNet val, 1000-way. Top-1 (%), "
             "agreement with the dense model (%), KL(dense‖·); speedup of the same setting on DeiT-Small "
             f"(random weights, fp32, median of {r['reps']}) at batch 64 and 1; the headless model's cosine to "
             "the dense embedding and 10-NN overlap (%). "
             f"{r['machine']}, torch {r['torch']}.", "",
             "| method | setting | GMACs | top-1 | agreement | KL(dense‖·) | speedup b64 | speedup b1 "
             "| cosine | 10-NN overlap |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        name = x["settings"] + (" (recommended)" if x["recommended"] else "")
        h = x["headless"]
        lines.append(f"| {x['method']} | {name} | {x['gmacs']:.3f} | {x['top1']:.2f} | {x['agreement']:.1f} "
                     f"| {x['kl']:.3f} | {fmt(x['speedup_b64'], '.2f')} | {fmt(x['speedup_b1'], '.2f')} "
                     f"| {h['cosine']:.4f} | {fmt(h['overlap'], '.1f')} |")
    lines += ["", "By half of the synsets (sorted names): top-1 / agreement / KL.", "",
              "| method | setting | first five | last five |", "|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['method']} | {x['settings']} | {half_text(x['first5'])} | {half_text(x['last5'])} |")
    return "\n".join(lines + ["", "Command: `" + r["command"] + "`", *c.timing_note(r), ""])


def curves(rows: list[dict], xval, key: str) -> dict:
    """(method, placement) -> [(x, y, row)] sorted by x: one curve per method and layer set (ToMe: one)."""
    out: dict = {}
    for x in rows:
        if x["method"] == "dense":
            continue
        where = "at " + x["settings"].split(" at ", 1)[1] if x["convert"] else ""
        out.setdefault((x["method"], where), []).append((xval(x), x[key], x))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def plot(r: dict, path: Path) -> None:
    """Top-1 and agreement against the DeiT-Small batch-64 speedup (counted GMACs where not timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = r["rows"], r["rows"][0]
    timed_run = all(x["speedup_b64"] is not None for x in rows)
    xval = (lambda x: x["speedup_b64"]) if timed_run else (lambda x: dense["gmacs"] / x["gmacs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "top1", "1000-way top-1 (%)"), (axes[1], "agreement", "agreement (%)")):
        for (method, where), pts in curves(rows, xval, key).items():
            style = {"evit": "o-", "squeeze": "s-", "tome": "^-"}[method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{method} {where}".strip())
            for sx, sy, x in pts:
                ax.annotate(x["settings"].split(" at ")[0].replace(" in every block", ""), (sx, sy), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.plot([1.0], [dense[key]], "k*", markersize=12, label="dense")
        for x in rows:
            if x["recommended"]:
                ax.plot([xval(x)], [x[key]], "o", mfc="none", mec="red", markersize=14, label="recommended")
        ax.set_xlabel("DeiT-Small speedup, batch 64, CPU" if timed_run else "dense GMACs / GMACs (not timed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Training-free token reduction, DeiT-Tiny, {r['images']} photos")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the run


def reference(args, paths, idx, images) -> dict:
    """Labels, synset halves, the dense DeiT-Tiny's logits and embeddings, and the dense DeiT-Small."""
    import timm
    import torch

    logits, emb = run_model(c.dense_model(), images, args.batch)
    small = None
    if not args.no_speed:
        torch.manual_seed(0)
        small = timm.create_model(SPEED_MODEL, pretrained=False).eval()
    return {"labels": c.labels_of(paths, idx), "classes": torch.tensor(c.class_numbers(paths, idx)),
            "logits": logits, "emb": emb, "small": small}


def run(args) -> dict:
    import timm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    paths = c.photos()
    idx = c.spread(list(range(len(paths))), args.limit)
    specs = settings(args.method_list)
    prog = c.Progress(len(idx) + len(specs) * (len(idx) + (0 if args.no_speed else 300 * args.reps)))
    images = torch.stack([load_photo(paths[i]) for i in idx])
    prog.step(f"decoded {len(idx)} photos", len(idx))
    ref = reference(args, paths, idx, images)
    r = {"rows": [], "machine": c.machine(), "command": c.command(__file__), "images": len(idx),
         "torch": torch.__version__, "timm": timm.__version__, "speed_model": SPEED_MODEL, "reps": args.reps,
         "preprocessing": f"PIL bicubic resize {RESIZE}, centre crop {CROP}, ImageNet mean/std"}
    for spec in specs:
        row = measure(spec, images, ref, args)
        r["rows"].append(row)
        c.write_results(out, STEM, r, markdown(r))
        prog.step(f"{spec['method']} {spec['settings']}: top-1 {row['top1']:.2f}, agreement {row['agreement']:.1f}"
                  f", speedup b64 {fmt(row['speedup_b64'], '.2f')}",
                  len(idx) + (0 if args.no_speed else 300 * args.reps))
    try:
        plot(r, out / f"{STEM}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return r


def spec_of(row: dict) -> dict:
    return {k: row.get(k) for k in ("method", "settings", "convert", "tome_r", "recommended")}


def retime(args) -> dict:
    """--speed-only: the speedups of every row of an earlier run measured again, the rest kept."""
    import timm
    import torch

    torch.manual_seed(0)
    small = timm.create_model(SPEED_MODEL, pretrained=False).eval()
    r = c.retime(args, __file__, STEM, lambda x, _: None if x["method"] == "dense" else speed(spec_of(x), small,
                                                                                          args.reps), markdown)
    plot(r, Path(args.out) / f"{STEM}.png")
    return r


def main(argv=None) -> int:
    return c.run_script(f"{STEM}.py", parse_args, lambda a: retime(a) if a.speed_only else run(a), markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
