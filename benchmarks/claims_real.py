"""What EViT wins or costs without training, and the paper's other claims, on the real photos.

Shown in docs/benchmarks.md, "The paper's claims, off the shelf" (the off-the-shelf table), and in
docs/finetuning.md, "The paper's settings, recovered" (the three models recovered with --recover 0-4),
both from benchmarks/results/claims_real.{json,md}; docs/algorithm.md ("Proportional attention")
points there. On the project's 2-core CPU machine the off-the-shelf rows
take about 5 minutes; the README's command with --recover 0-4 about 20 (three recoveries of 3.5 to 5
minutes each).

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

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and _finetune, also when run from elsewhere
import _common as c  # noqa: E402
import _finetune  # noqa: E402


def parse_args(argv):
    ap = c.Parser(__doc__)
    c.add_evit_options(ap)
    ap.add_argument("--placements", default="5,8,11/6,9,12/7,9,11/3,6,9",
                    help="Other placements, '/' between them, at the GMACs of --layers. [5,8,11/6,9,12/7,9,11/3,6,9]")
    ap.add_argument("--limit", type=int, default=None, help="At most N held-out photos, evenly spaced (all: 982).")
    ap.add_argument("--recover", default=None, help="Also recover on these classes (0..9 in synset order, e.g. 0-4).")
    _finetune.add_options(ap, 2.0, "Epochs of each recovery. [2: finetune's default for a classifier]")
    ap.add_argument("--out", default=str(c.RESULTS), help="Folder for claims_real.{json,md}.")
    args = ap.parse_args(argv)
    c.check_args(ap, args, ("limit", "train_limit"))
    try:
        args.placement_lists = [c.parse_layers(p) for p in args.placements.split("/") if p]
        args.classes = c.parse_classes(args.recover) if args.recover else None
    except ValueError:
        ap.error(f"--placements/--recover: expected layers such as 4,7,10 (1..12) and classes such as 0-4, "
                 f"got {args.placements!r} / {args.recover!r}")
    if args.classes is not None and len(args.classes) == 10:
        ap.error("--recover must leave at least one class unseen")
    return args


def models(args):
    """(name, model, size) for every off-the-shelf row: the size picks the preprocessing."""
    from evit_cli import convert
    from evit_cli.model.macs import count_macs, largest_keep_rate_under, match_macs

    def dense(size=224):
        m = c.dense_model()
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

    logits = c.outputs(model, cached[size])
    row = {"model": name, "img_size": size, "gmacs": round(count_macs(model, size) / 1e9, 4), **(extra or {})}
    everything = torch.ones(len(labels), dtype=torch.bool)
    row["all"] = c.score(logits, dense_logits, labels, everything)
    if seen is not None:
        row["seen"] = c.score(logits, dense_logits, labels, seen)
        row["unseen"] = c.score(logits, dense_logits, labels, ~seen)
    return row


def markdown(r: dict) -> str:
    lines = ["# Without training, and the paper's claims (benchmarks/claims_real.py)", "",
             f"DeiT-Tiny (../shared/real) on {r['test_photos']} held-out photos. Figures: 1000-way top-1 (%) / "
             "agreement with the dense model at 224 px (%) / KL(dense || model) (photos). "
             f"{r['machine']}, torch {r['torch']}.", "",
             "| model | GMACs | all held-out photos |", "|---|---|---|"]
    lines += [f"| {x['model']} | {x['gmacs']:.3f} | {c.fmt_score(x['all'])} |" for x in r["rows"]]
    if r["recovered"]:
        lines += ["", f"Recovered with `evit finetune` defaults ({r['epochs']:g} epochs"
                  f"{', ' + r['finetune_args'] if r.get('finetune_args') else ''}) on {r['train_photos']} "
                  f"photos of classes {r['recover']} (flat folder):", "",
                  "| model | classes it saw | classes it never saw |", "|---|---|---|"]
        lines += [f"| {x['model']} | {c.fmt_score(x['seen'])} | {c.fmt_score(x['unseen'])} |" for x in r["recovered"]]
    return "\n".join(lines + ["", "Command: `" + r["command"] + "`", ""])


def write(out: Path, r: dict) -> None:
    c.write_results(out, "claims_real", r, markdown(r))


def run(args) -> dict:
    import torch

    out = Path(args.out)
    paths = c.photos()
    idx = c.held_out(paths, args.limit)
    labels = c.labels_of(paths, idx)
    rows = models(args)
    n_rec = 3 if args.classes is not None else 0
    prog = c.Progress(len(idx) * (2 + len(rows) + n_rec) + n_rec * 4 * args.epochs * 900)
    cached = {s: c.cached_images(paths, idx, rows[0][1], s) for s in (224, 288)}
    prog.step(f"decoded {len(idx)} held-out photos at 224 and 288 px", 2 * len(idx))
    dense_logits = c.outputs(rows[0][1], cached[224])
    r = {"test_photos": len(idx), "machine": c.machine(), "torch": torch.__version__, "command": c.command(__file__),
         "rows": [], "recovered": [], "recover": args.recover, "epochs": args.epochs,
         "finetune_args": args.finetune_args, "train_photos": None}
    for name, model, size in rows:
        r["rows"].append(score_row(name, model, size, cached, dense_logits, labels))
        write(out, r)
        prog.step(f"scored {name}", len(idx))
    if args.classes is not None:
        recover_rows(args, r, rows, paths, idx, cached, dense_logits, labels, prog, out)
    return r


def recover_rows(args, r, rows, paths, idx, cached, dense_logits, labels, prog, out) -> None:
    """Recover the fuse, drop and 288 px models on the --recover classes and score them."""
    seen = c.seen_mask(paths, idx, args.classes)
    picked = [rows[2], rows[3], rows[-1]]  # fuse, drop, 288 px
    with tempfile.TemporaryDirectory(prefix="claims_real.") as tmp:
        work = Path(tmp)
        n = r["train_photos"] = c.train_folder(paths, args.classes, args.train_limit, work / "train")
        for k, (name, model, size) in enumerate(picked):
            recovered, secs = _finetune.recover(model, work / "train", work, f"r{k}", args)
            prog.step(f"recovered {name} on {n} photos ({secs:.0f} s)", 4 * args.epochs * 900)
            row = score_row(f"{name}, recovered", recovered, size, cached, dense_logits, labels, seen,
                            {"train_s": round(secs)})
            r["recovered"].append(row)
            write(out, r)
            prog.step(f"scored {name}, recovered", len(idx))


def main(argv=None) -> int:
    return c.run_script("claims_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
