"""Does label-free recovery win back the dense model, or only the photos it saw?

Shown in docs/finetuning.md, "Winning the accuracy back, measured: on images the fine-tune never
saw": the table of the two splits (0-4 and 5-9), from benchmarks/results/generalize_real.{json,md}.
Its command there takes about 40 minutes on the project's 2-core CPU machine (four recoveries of
about 6-12 minutes each, plus scoring).

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

    python benchmarks/generalize_real.py --splits 0-4/5-9 --out benchmarks/results
    python benchmarks/generalize_real.py --splits 0-4 --train-limit 100 --limit 200 --epochs 0.5 --out /tmp/g  # smoke

Extra `evit finetune` options for every recovery: --finetune-args "--lr 1e-5 --mixup 0.8".
Results: OUT/generalize_real.json and OUT/generalize_real.md (with --method squeeze:
OUT/generalize_real_squeeze.{json,md}), rewritten after every row.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and _finetune, also when run from elsewhere
import _common as c  # noqa: E402
import _finetune  # noqa: E402


def parse_args(argv):
    ap = c.Parser(__doc__)
    ap.add_argument("--splits", default="0-4/5-9", help="The classes each split trains on, splits separated by '/', "
                    "each like 0-4 or 0,2,4,6,8 (classes 0..9 in synset order). [0-4/5-9: two splits]")
    c.add_evit_options(ap)
    ap.add_argument("--method", default="evit", choices=("evit", "squeeze"),
                    help="evit_cli.convert's method: the paper's (evit) or the squeeze. [evit]")
    _finetune.add_options(ap, 2.0, "Epochs of each recovery. [2: finetune's default for a classifier]")
    ap.add_argument("--limit", type=int, default=None, help="At most N held-out photos, evenly spaced (all: 982).")
    ap.add_argument("--batch", type=int, default=64, help="Scoring batch size. [64]")
    ap.add_argument("--no-control", action="store_true", help="Skip the dense model recovered the same way.")
    ap.add_argument("--out", default=str(c.RESULTS), help="Folder for generalize_real.{json,md}.")
    args = ap.parse_args(argv)
    try:
        args.split_classes = [c.parse_classes(g) for g in args.splits.split("/")]
        if any(len(s) == 10 for s in args.split_classes):
            raise ValueError(args.splits)
    except ValueError:
        ap.error(f"--splits {args.splits!r}: expected class sets such as 0-4/5-9 or 0,2,4,6,8/1,3,5,7,9 (classes 0..9, "
                 f"each split leaving at least one class unseen)")
    c.check_args(ap, args, ("train_limit", "limit", "batch"))
    return args


def recover_args(keep: float, layers: list[int], method: str = "evit") -> list[str]:
    """`evit finetune deit_tiny_patch16_224 --checkpoint W --keep-rate K --layers L [--method M]`: converted by
    the CLI."""
    return ["deit_tiny_patch16_224", "--checkpoint", str(c.WEIGHTS), "--keep-rate", f"{keep:g}",
            "--layers", ",".join(map(str, layers))] + (["--method", method] if method != "evit" else [])


def plan(args, n_train: list[int], n_test: int) -> float:
    """Work in image-passes (a recovery epoch counts 4 passes per photo: teacher, forward, backward)."""
    recoveries = sum(n * args.epochs * 4 * (1 if args.no_control else 2) for n in n_train)
    scorings = n_test * (2 + len(n_train) * (1 if args.no_control else 2))
    return recoveries + scorings


def name_of(result: dict) -> str:
    """The method as the tables name it: EViT (the paper's) or squeeze."""
    return "EViT" if result.get("method", "evit") == "evit" else result["method"]


def row(name: str, split: str, logits, ctx: dict, seen: list[int], train_s: float | None, n_train: int | None) -> dict:
    import torch

    seen_mask = torch.tensor([k in seen for k in ctx["classes"]])
    r = {"model": name, "split": split, "train_photos": n_train, "train_s": train_s}
    if seen:
        r["seen"] = c.score(logits, ctx["dense"], ctx["labels"], seen_mask)
    r["unseen"] = c.score(logits, ctx["dense"], ctx["labels"], ~seen_mask)
    return r


def markdown(result: dict) -> str:
    lines = [
        "# Recovery on some classes, scored on the classes it never saw (benchmarks/generalize_real.py)",
        "",
        f"DeiT-Tiny (../shared/real), {name_of(result)} keep {result['keep']:g} at layers {result['layers']}. "
        "Photos sorted by "
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
        lines.append(f"| {r['split']} | {r['model']} | {r['train_photos'] or '-'} | {c.fmt_score(r.get('seen'))} | "
                     f"{c.fmt_score(r['unseen'])} | {t} |")
    lines += ["", "Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    """OUT/generalize_real.{json,md}; for another method than the paper's, generalize_real_METHOD.{json,md}."""
    method = result.get("method", "evit")
    c.write_results(out, "generalize_real" + ("" if method == "evit" else f"_{method}"), result, markdown(result))


def run(args) -> dict:
    import torch

    import evit_cli

    torch.manual_seed(0)
    out = Path(args.out)
    paths = c.photos()
    test_idx = c.held_out(paths, args.limit)
    dense = c.dense_model()
    ctx = {"classes": c.class_numbers(paths, test_idx), "labels": c.labels_of(paths, test_idx)}
    result = {"keep": args.keep, "layers": args.layers, "method": args.method, "epochs": args.epochs,
              "finetune_args": args.finetune_args,
              "test_photos": len(test_idx), "machine": c.machine(), "torch": torch.__version__,
              "command": c.command(__file__), "rows": []}
    with tempfile.TemporaryDirectory(prefix="generalize_real.") as tmp:
        work = Path(tmp)
        folders = [work / f"train_{k}" for k in range(len(args.split_classes))]
        n_train = [c.train_folder(paths, s, args.train_limit, f) for s, f in zip(args.split_classes, folders)]
        prog = c.Progress(plan(args, n_train, len(test_idx)))
        cached = c.cached_images(paths, test_idx, dense, batch=args.batch)  # decoded once, float16

        def logits(model, what):
            lg = c.outputs(model, cached)
            prog.step(f"scored {what} on {len(test_idx)} photos", len(test_idx))
            return lg

        ctx["dense"] = logits(dense, "the dense model")
        shelf = evit_cli.convert("deit_tiny_patch16_224", keep_rate=args.keep, layers=args.layer_list,
                                 method=args.method, checkpoint=str(c.WEIGHTS))
        label = f"{name_of(result)} {args.keep:g}"
        shelf_logits = logits(shelf, "off-the-shelf EViT")
        for k, (classes, folder) in enumerate(zip(args.split_classes, folders)):
            split = ",".join(map(str, classes))
            result["rows"] += [row("dense", split, ctx["dense"], ctx, classes, None, None),
                               row(f"{label} off the shelf", split, shelf_logits, ctx, classes, None, None)]
            runs = [(f"{label} recovered", args.keep)] + ([] if args.no_control
                                                                     else [("dense recovered (control)", 1.0)])
            for name, keep in runs:
                model, secs = _finetune.recover(recover_args(keep, args.layer_list, args.method), folder, work,
                                                f"model_{k}_{keep:g}", args)
                prog.step(f"split {split}: {name} ({n_train[k]} photos, {secs:.0f} s)", n_train[k] * args.epochs * 4)
                lg = logits(model, f"split {split}: {name}")
                result["rows"].append(row(name, split, lg, ctx, classes, secs, n_train[k]))
                write(out, result)
            write(out, result)
    return result


def main(argv=None) -> int:
    return c.run_script("generalize_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
