"""Does label-free recovery win back the dense model, or only the photos it saw?

DeiT-Tiny (../shared/real weights), EViT at --keep on --layers. The photos of
../shared/real/imagenette-val are sorted by path; index % 4 == 0 is held out for
scoring, the rest may train. For each split (a set of the 10 classes), `evit finetune`
recovers the EViT model from its dense model on a FLAT folder (no labels) of the
training photos of those classes only, exactly as a user would run it; the same is
done to the dense model (the control). Every model is then scored on the held-out
photos of the classes it SAW and of those it NEVER SAW: 1000-way top-1, agreement
with the ORIGINAL dense model (top-1 equal) and KL(dense || model), with the number
of photos beside every figure. Off-the-shelf EViT and the dense model are scored too.

Example (two splits: the first five classes, then the last five):

    python benchmarks/generalize_real.py --splits 0-4/5-9 --epochs 1 --out benchmarks/results
    python benchmarks/generalize_real.py --splits 0-4 --train-limit 100 --limit 200 --epochs 0.5 --out /tmp/g  # smoke

Extra `evit finetune` options for every recovery: --finetune-args "--lr 1e-5 --mixup 0.8".
Results: OUT/generalize_real.json and OUT/generalize_real.md, rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
# ../shared/real beside the checkout (or beside a folder above it, for a worktree)
REAL = next((p / "shared" / "real" for p in ROOT.parents if (p / "shared" / "real").is_dir()),
            ROOT.parent / "shared" / "real")
WEIGHTS = REAL / "deit_tiny_patch16_224.safetensors"
PHOTOS = REAL / "imagenette-val"
# ImageNet-1k index of each Imagenette synset (../shared/real/README.md)
SYNSET_INDEX = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
                "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701}
SYNSETS = sorted(SYNSET_INDEX)
SUFFIXES = {".jpeg", ".jpg", ".png"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse would print the whole usage first)
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def parse_classes(text: str) -> list[int]:
    """'0-4' or '0,2,4,6,8' -> class numbers (0..9 in synset order)."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        out += range(lo, hi + 1)
    if not out or any(c < 0 or c > 9 for c in out) or len(set(out)) != len(out):
        raise ValueError(text)
    return sorted(out)


def check_numbers(ap, args, counts) -> None:
    """Usage errors (one line, exit 2) for the counts that must be at least 1, --workers, --keep, --epochs."""
    for name in counts:
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.workers < 0:
        ap.error(f"--workers must be at least 0, got {args.workers}")
    if not 0 < args.keep <= 1:
        ap.error(f"--keep must be in (0, 1], got {args.keep}")
    if args.epochs is not None and not args.epochs > 0:
        ap.error(f"--epochs must be above 0, got {args.epochs}")


def parse_args(argv):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default="0-4/5-9", help="The classes each split trains on, splits separated by '/', "
                    "each like 0-4 or 0,2,4,6,8 (classes 0..9 in synset order). [0-4/5-9: two splits]")
    ap.add_argument("--keep", type=float, default=0.7, help="EViT keep rate. [0.7]")
    ap.add_argument("--layers", default="4,7,10", help="1-based EViT layers. [4,7,10]")
    ap.add_argument("--epochs", type=float, default=2.0, help="Epochs of each recovery. [2: finetune's default]")
    ap.add_argument("--train-limit", type=int, default=None, help="At most N training photos per split, evenly spaced.")
    ap.add_argument("--limit", type=int, default=None, help="At most N held-out photos, evenly spaced (all: 982).")
    ap.add_argument("--batch", type=int, default=64, help="Scoring batch size. [64]")
    ap.add_argument("--workers", type=int, default=2, help="Loader workers of `evit finetune`. [2]")
    ap.add_argument("--finetune-args", default="", help="Extra `evit finetune` options for every recovery.")
    ap.add_argument("--no-control", action="store_true", help="Skip the dense model recovered the same way.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="Folder for generalize_real.{json,md}.")
    args = ap.parse_args(argv)
    try:
        args.split_classes = [parse_classes(g) for g in args.splits.split("/")]
        if any(len(c) == 10 for c in args.split_classes):
            raise ValueError(args.splits)
    except ValueError:
        ap.error(f"--splits {args.splits!r}: expected class sets such as 0-4/5-9 or 0,2,4,6,8/1,3,5,7,9 (classes 0..9, "
                 f"each split leaving at least one class unseen)")
    check_numbers(ap, args, ("train_limit", "limit", "batch"))
    try:
        args.layer_list = [int(x) for x in args.layers.split(",")]
        assert all(1 <= n <= 12 for n in args.layer_list)
    except (ValueError, AssertionError):
        ap.error(f"--layers {args.layers!r}: expected 1-based block numbers 1..12 such as 4,7,10")
    return args


# --------------------------------------------------------------------------- photos


def photos() -> list[Path]:
    return sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in SUFFIXES)


def held_out(paths: list[Path], limit: int | None) -> list[int]:
    idx = [i for i in range(len(paths)) if i % 4 == 0]
    return idx if limit is None else idx[:: max(1, len(idx) // limit)][:limit]


def train_folder(paths: list[Path], classes: list[int], limit: int | None, folder: Path) -> int:
    """A flat folder of symlinks to the training photos of ``classes`` (no labels)."""
    names = {SYNSETS[c] for c in classes}
    idx = [i for i in range(len(paths)) if i % 4 and paths[i].parent.name in names]
    if limit is not None:
        idx = idx[:: max(1, len(idx) // limit)][:limit]
    folder.mkdir(parents=True)
    for i in idx:
        (folder / f"{i:05d}_{paths[i].name}").symlink_to(paths[i])
    return len(idx)


# --------------------------------------------------------------------------- models and scoring


def dense_model():
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return model.eval()


def eval_images(paths: list[Path], idx: list[int], model, batch: int):
    """The held-out photos through the dense model's own eval preprocessing, in batches."""
    import timm.data
    import torch
    from PIL import Image

    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    for s in range(0, len(idx), batch):
        chunk = idx[s:s + batch]
        yield torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in chunk])


def logits_of(model, batches) -> "torch.Tensor":
    import torch

    with torch.inference_mode():
        return torch.cat([model.eval()(x).float() for x in batches])


def score(logits, dense_logits, labels, mask) -> dict:
    import torch.nn.functional as F

    lg, dl, y = logits[mask], dense_logits[mask], labels[mask]
    pred, dpred = lg.argmax(-1), dl.argmax(-1)
    kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(dl, -1), reduction="none", log_target=True).sum(-1)
    n = int(mask.sum())
    return {"photos": n, "top1": 100.0 * float((pred == y).float().mean()), "agreement":
            100.0 * float((pred == dpred).float().mean()), "kl": float(kl.mean()),
            "top1_correct": int((pred == y).sum()),
            "agree_count": int((pred == dpred).sum()), "dense_top1": 100.0 * float((dpred == y).float().mean())}


# --------------------------------------------------------------------------- recovery through the CLI


def finetune(model: list[str], data: Path, out: Path, args, log: Path) -> float:
    """`evit finetune MODEL... --dataset DATA --output OUT` as a user runs it (plus ``args.finetune_args``),
    its output in ``log``; returns seconds. The other real-photo benchmarks recover through it too."""
    epochs = [] if args.epochs is None else ["--epochs", f"{args.epochs:g}"]  # None: finetune's default
    cmd = [sys.executable, "-m", "evit_cli", "finetune", *model, "--dataset", str(data), "--output", str(out),
           *epochs, "--workers", str(args.workers), "--no-bench", "--overwrite",
           *shlex.split(getattr(args, "finetune_args", ""))]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"evit finetune failed ({rc}): {' | '.join(tail)}\ncommand: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def recover(keep: float, layers: list[int], data: Path, out: Path, args, log: Path) -> float:
    """`evit finetune deit_tiny_patch16_224 --checkpoint W --keep-rate K --layers L ...`; returns seconds."""
    return finetune(["deit_tiny_patch16_224", "--checkpoint", str(WEIGHTS), "--keep-rate", f"{keep:g}",
                     "--layers", ",".join(map(str, layers))], data, out, args, log)


# --------------------------------------------------------------------------- the run


class Progress:
    """Work done in image-passes (a recovery epoch counts 4 passes per photo: teacher, forward, backward)."""

    def __init__(self, total: float):
        self.total, self.done, self.t0 = total, 0.0, time.perf_counter()

    def step(self, what: str, work: float) -> None:
        self.done += work
        spent = time.perf_counter() - self.t0
        eta = spent / self.done * (self.total - self.done) if self.done else math.nan
        print(f"[{100 * self.done / self.total:5.1f}%] {what}  elapsed {spent / 60:.1f} min, ETA {eta / 60:.1f} min",
              file=sys.stderr, flush=True)


def plan(args, n_train: list[int], n_test: int) -> float:
    recoveries = sum(n * args.epochs * 4 * (1 if args.no_control else 2) for n in n_train)
    scorings = n_test * (2 + len(n_train) * (1 if args.no_control else 2))
    return recoveries + scorings


def row(name: str, split: str, logits, ctx: dict, seen: list[int], train_s: float | None, n_train: int | None) -> dict:
    import torch

    seen_mask = torch.tensor([c in seen for c in ctx["classes"]])
    r = {"model": name, "split": split, "train_photos": n_train, "train_s": train_s}
    if seen:
        r["seen"] = score(logits, ctx["dense"], ctx["labels"], seen_mask)
    r["unseen"] = score(logits, ctx["dense"], ctx["labels"], ~seen_mask)
    return r


def fmt(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['top1']:.2f} / {s['agreement']:.2f} / {s['kl']:.4f} ({s['photos']})"


def markdown(result: dict) -> str:
    lines = [
        "# Recovery on some classes, scored on the classes it never saw (benchmarks/generalize_real.py)",
        "",
        f"DeiT-Tiny (../shared/real), EViT keep {result['keep']:g} at layers {result['layers']}. Photos sorted by "
        f"path; "
        f"index % 4 == 0 held out ({result['test_photos']} photos). Each split recovers with `evit finetune` "
        f"({result['epochs']:g} epochs{', ' + result['finetune_args'] if result['finetune_args'] else ''}) on a flat "
        "folder (no labels) of the other photos of its classes only. Figures: 1000-way top-1 (%) / agreement with the "
        "ORIGINAL dense model (%) / KL(dense || model), (number of photos): one photo of 490 is 0.2 points. "
        "`evit finetune` holds out 10% of the folder for its own validation, so it trains on 90% of the photos "
        "counted.",
        f"{result['machine']}, torch {result['torch']}.",
        "",
        "| split (classes trained on) | model | training photos | seen classes | never-seen classes | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['split']} | {r['model']} | {r['train_photos'] or '-'} | {fmt(r.get('seen'))} | "
                     f"{fmt(r['unseen'])} | {t} |")
    lines += ["", "Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    for name, text in (("generalize_real.json", json.dumps(result, indent=2) + "\n"),
                       ("generalize_real.md", markdown(result))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def run(args) -> dict:
    import torch

    import evit_cli

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = photos()
    test_idx = held_out(paths, args.limit)
    dense = dense_model()
    ctx = {"classes": [SYNSETS.index(paths[i].parent.name) for i in test_idx]}
    ctx["labels"] = torch.tensor([SYNSET_INDEX[SYNSETS[c]] for c in ctx["classes"]])
    result = {"keep": args.keep, "layers": args.layers, "epochs": args.epochs, "finetune_args": args.finetune_args,
              "test_photos": len(test_idx), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "command": "python benchmarks/generalize_real.py " + shlex.join(sys.argv[1:]),
              "rows": []}
    with tempfile.TemporaryDirectory(prefix="generalize_real.") as tmp:
        work = Path(tmp)
        folders = [work / f"train_{k}" for k in range(len(args.split_classes))]
        n_train = [train_folder(paths, c, args.train_limit, f) for c, f in zip(args.split_classes, folders)]
        prog = Progress(plan(args, n_train, len(test_idx)))

        cached = [x.half() for x in eval_images(paths, test_idx, dense, args.batch)]  # decoded once, float16

        def logits(model, what):
            lg = logits_of(model, (x.float() for x in cached))
            prog.step(f"scored {what} on {len(test_idx)} photos", len(test_idx))
            return lg

        ctx["dense"] = logits(dense, "the dense model")
        shelf = evit_cli.convert("deit_tiny_patch16_224", keep_rate=args.keep, layers=args.layer_list,
                                 checkpoint=str(WEIGHTS))
        shelf_logits = logits(shelf, "off-the-shelf EViT")
        for k, (classes, folder) in enumerate(zip(args.split_classes, folders)):
            split = ",".join(map(str, classes))
            result["rows"] += [row("dense", split, ctx["dense"], ctx, classes, None, None),
                               row(f"EViT {args.keep:g} off the shelf", split, shelf_logits, ctx, classes, None, None)]
            runs = [(f"EViT {args.keep:g} recovered", args.keep)] + ([] if args.no_control
                                                                     else [("dense recovered (control)", 1.0)])
            for name, keep in runs:
                dest = work / f"model_{k}_{keep:g}"
                secs = recover(keep, args.layer_list, folder, dest, args, work / f"log_{k}_{keep:g}.txt")
                prog.step(f"split {split}: {name} ({n_train[k]} photos, {secs:.0f} s)", n_train[k] * args.epochs * 4)
                lg = logits(evit_cli.load(dest), f"split {split}: {name}")
                result["rows"].append(row(name, split, lg, ctx, classes, secs, n_train[k]))
                write(out, result)
            write(out, result)
    return result


def run_script(script: str, parse, work, render, argv=None) -> int:
    """A benchmark script's command line: the real weights and photos must be there; Ctrl-C is
    "interrupted" (exit 130), a failed run one line (exit 1); the result is printed as Markdown."""
    args = parse(argv)
    if not WEIGHTS.exists() or not PHOTOS.is_dir():
        sys.stderr.write(f"{script}: error: {REAL} must hold the DeiT-Tiny weights and imagenette-val\n")
        return 2
    try:
        result = work(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except RuntimeError as e:
        sys.stderr.write(f"{script}: error: {e}\n")
        return 1
    print(render(result))
    return 0


def main(argv=None) -> int:
    return run_script("generalize_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
