"""What EViT wins or costs without training, and the paper's other claims, on the real photos.

DeiT-Tiny (../shared/real weights) on the held-out photos of ../shared/real/imagenette-val
(sorted by path, index % 4 == 0; every figure has its photo count): 1000-way top-1, agreement
with the dense model at 224 px and KL(dense || model), with the counted GMACs of each model.

Off the shelf (no training):
- fusing the inattentive tokens against dropping them (`--no-fuse`), at --keep on --layers;
- proportional attention (ToMe's, for the fused token: every attention logit for a token raised by
  the log of the patches it holds; `evit_cli.convert(..., proportional_attention=True)`);
- where the layers go at equal GMACs: each placement of --placements gets the largest keep rate
  whose GMACs do not exceed those of --layers at --keep;
- 288 px at the dense model's 224 px GMACs (`evit convert --img-size 288 --match-macs 224`)
  against the dense model at 224 px (and the dense model at 288 px, for reference).

With --recover CLASSES, the fuse / drop / 288 px models are also recovered with `evit finetune`
defaults (--epochs) on a flat folder of the other photos of those classes and scored on the
held-out photos of the classes they saw and of those they never saw.

    python benchmarks/claims_real.py --out benchmarks/results
    python benchmarks/claims_real.py --recover 0-4 --out benchmarks/results
    python benchmarks/claims_real.py --limit 100 --placements 6,9,12 --out /tmp/c  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when run from elsewhere
import generalize_real as g  # noqa: E402


def parse_args(argv):
    ap = g.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.7, help="EViT keep rate. [0.7]")
    ap.add_argument("--layers", default="4,7,10", help="1-based EViT layers, the paper's. [4,7,10]")
    ap.add_argument("--placements", default="5,8,11/6,9,12/7,9,11/3,6,9",
                    help="Other placements, '/' between them, at the GMACs of --layers. [5,8,11/6,9,12/7,9,11/3,6,9]")
    ap.add_argument("--limit", type=int, default=None, help="At most N held-out photos, evenly spaced (all: 982).")
    ap.add_argument("--recover", default=None, help="Also recover on these classes (0..9 in synset order, e.g. 0-4).")
    ap.add_argument("--epochs", type=float, default=2.0, help="Epochs of each recovery. [2: the default]")
    ap.add_argument("--train-limit", type=int, default=None, help="At most N training photos, evenly spaced.")
    ap.add_argument("--workers", type=int, default=2, help="Loader workers of `evit finetune`. [2]")
    ap.add_argument("--out", default=str(g.ROOT / "benchmarks" / "results"), help="Folder for claims_real.{json,md}.")
    args = ap.parse_args(argv)
    g.check_numbers(ap, args, ("limit", "train_limit"))
    try:
        args.layer_list = _layers(args.layers)
        args.placement_lists = [_layers(p) for p in args.placements.split("/") if p]
        args.classes = g.parse_classes(args.recover) if args.recover else None
    except ValueError:
        ap.error(f"--layers/--placements/--recover: expected layers such as 4,7,10 (1..12) and classes such as 0-4, "
                 f"got {args.layers!r} / {args.placements!r} / {args.recover!r}")
    if args.classes is not None and len(args.classes) == 10:
        ap.error("--recover must leave at least one class unseen")
    return args


def _layers(text: str) -> list[int]:
    out = [int(x) for x in text.split(",")]
    if not out or any(not 1 <= n <= 12 for n in out) or out != sorted(set(out)):
        raise ValueError(text)
    return out


def cached_at(paths, idx, size: int):
    """The held-out photos through the dense model's own eval preprocessing (timm's, crop 0.9) at
    ``size`` px, float16."""
    import timm.data
    import torch
    from PIL import Image

    tf = timm.data.create_transform(input_size=(3, size, size), crop_pct=0.9,
                                    interpolation="bicubic", mean=timm.data.IMAGENET_DEFAULT_MEAN,
                                    std=timm.data.IMAGENET_DEFAULT_STD)
    return [torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in idx[s:s + 64]]).half()
            for s in range(0, len(idx), 64)]


def models(args):
    """(name, model, size) for every off-the-shelf row: the size picks the preprocessing."""
    from evit_cli import convert
    from evit_cli.model.macs import count_macs, largest_keep_rate_under, match_macs

    def dense(size=224):
        m = g.dense_model()
        if size != 224:
            from evit_cli.adapters import get_adapter
            get_adapter(m).set_img_size(m, size)
        return m

    paper = convert(dense(), keep_rate=args.keep, layers=args.layer_list)
    rows = [("dense 224 px", dense(), 224), ("dense 288 px", dense(288), 288),
            (f"EViT {args.keep:g} at {args.layers}, fuse", paper, 224),
            (f"EViT {args.keep:g} at {args.layers}, drop (--no-fuse)",
             convert(dense(), keep_rate=args.keep, layers=args.layer_list, fuse=False), 224),
            (f"EViT {args.keep:g} at {args.layers}, fuse, proportional attention",
             convert(dense(), keep_rate=args.keep, layers=args.layer_list, proportional_attention=True), 224)]
    budget = count_macs(paper, 224)
    for layers in args.placement_lists:
        m = convert(dense(), keep_rate=1.0, layers=layers)
        rate = largest_keep_rate_under(m, budget)
        rows.append((f"EViT {rate:.3f} at {','.join(map(str, layers))} (same GMACs)", convert(m, rate, layers), 224))
    big = dense(288)
    rate = match_macs(big, 224, args.layer_list)
    rows.append((f"EViT {rate:.3f} at {args.layers}, 288 px (dense 224 px GMACs)", big, 288))
    return rows


def score_row(name, model, size, cached, dense_logits, labels, seen=None, extra=None) -> dict:
    import torch

    from evit_cli.model.macs import count_macs

    logits = g.logits_of(model, (x.float() for x in cached[size]))
    row = {"model": name, "img_size": size, "gmacs": round(count_macs(model, size) / 1e9, 4), **(extra or {})}
    everything = torch.ones(len(labels), dtype=torch.bool)
    row["all"] = g.score(logits, dense_logits, labels, everything)
    if seen is not None:
        row["seen"] = g.score(logits, dense_logits, labels, seen)
        row["unseen"] = g.score(logits, dense_logits, labels, ~seen)
    return row


def fmt(s) -> str:
    return "-" if s is None else f"{s['top1']:.2f} / {s['agreement']:.2f} / {s['kl']:.4f} ({s['photos']})"


def markdown(r: dict) -> str:
    lines = ["# Without training, and the paper's claims (benchmarks/claims_real.py)", "",
             f"DeiT-Tiny (../shared/real) on {r['test_photos']} held-out photos. Figures: 1000-way top-1 (%) / "
             "agreement with the dense model at 224 px (%) / KL(dense || model) (photos). "
             f"{r['machine']}, torch {r['torch']}.", "",
             "| model | GMACs | all held-out photos |", "|---|---|---|"]
    lines += [f"| {x['model']} | {x['gmacs']:.3f} | {fmt(x['all'])} |" for x in r["rows"]]
    if r["recovered"]:
        lines += ["", f"Recovered with `evit finetune` defaults ({r['epochs']:g} epochs) on {r['train_photos']} "
                  f"photos of classes {r['recover']} (flat folder):", "",
                  "| model | classes it saw | classes it never saw |", "|---|---|---|"]
        lines += [f"| {x['model']} | {fmt(x['seen'])} | {fmt(x['unseen'])} |" for x in r["recovered"]]
    return "\n".join(lines + ["", "Command: `" + r["command"] + "`", ""])


def run(args) -> dict:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = g.photos()
    idx = g.held_out(paths, args.limit)
    labels = torch.tensor([g.SYNSET_INDEX[paths[i].parent.name] for i in idx])
    rows = models(args)
    n_rec = 3 if args.classes is not None else 0
    prog = g.Progress(len(idx) * (2 + len(rows) + n_rec) + n_rec * 4 * args.epochs * 900)
    cached = {s: cached_at(paths, idx, s) for s in (224, 288)}
    prog.step(f"decoded {len(idx)} held-out photos at 224 and 288 px", 2 * len(idx))
    dense_logits = g.logits_of(rows[0][1], (x.float() for x in cached[224]))
    r = {"test_photos": len(idx), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
         "torch": torch.__version__, "command": "python benchmarks/claims_real.py " + shlex.join(sys.argv[1:]),
         "rows": [], "recovered": [], "recover": args.recover, "epochs": args.epochs, "train_photos": None}
    for name, model, size in rows:
        r["rows"].append(score_row(name, model, size, cached, dense_logits, labels))
        write(out, r)
        prog.step(f"scored {name}", len(idx))
    if args.classes is not None:
        recover_rows(args, r, rows, paths, idx, cached, dense_logits, labels, prog, out)
    return r


def recover_rows(args, r, rows, paths, idx, cached, dense_logits, labels, prog, out) -> None:
    """Recover the fuse, drop and 288 px models on the --recover classes and score them."""
    import evit_cli

    seen = torch_seen(paths, idx, args.classes)
    picked = [rows[2], rows[3], rows[-1]]  # fuse, drop, 288 px
    with tempfile.TemporaryDirectory(prefix="claims_real.") as tmp:
        work = Path(tmp)
        n = r["train_photos"] = g.train_folder(paths, args.classes, args.train_limit, work / "train")
        for k, (name, model, size) in enumerate(picked):
            folder = evit_cli.save(model, work / f"m{k}")
            secs = g.finetune([str(folder)], work / "train", work / f"r{k}", args, work / f"log{k}.txt")
            prog.step(f"recovered {name} on {n} photos ({secs:.0f} s)", 4 * args.epochs * 900)
            row = score_row(f"{name}, recovered", evit_cli.load(work / f"r{k}"), size, cached, dense_logits, labels,
                            seen, {"train_s": round(secs)})
            r["recovered"].append(row)
            write(out, r)
            prog.step(f"scored {name}, recovered", len(idx))


def torch_seen(paths, idx, classes):
    import torch

    names = {g.SYNSETS[c] for c in classes}
    return torch.tensor([paths[i].parent.name in names for i in idx])


def write(out: Path, r: dict) -> None:
    for name, text in (("claims_real.json", json.dumps(r, indent=2) + "\n"), ("claims_real.md", markdown(r))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv=None) -> int:
    return g.run_script("claims_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
