"""Label-free recovery of an embedding model, scored on classes it never saw.

Shown in docs/finetuning.md, "Embedding models": the table of the headless DeiT-Tiny recovered on
classes 0-4 (4-epoch rows from benchmarks/results/embed_real.{json,md}, 2-epoch rows from
embed_real_2ep.{json,md}, a run of --epochs 2 renamed afterwards). On the project's 2-core CPU machine
the --epochs 4 command takes about 25 minutes (two recoveries of about 10 and 14 minutes, plus scoring),
--epochs 2 about 13.

The headless real DeiT-Tiny (../shared/real weights, num_classes=0: the class-token embedding after
the final norm, timm's pre-logits) is converted to EViT (--keep at --layers) and recovered with
`evit finetune` defaults on a FLAT folder (no labels) of the training photos (index % 4 != 0) of the
--train classes. Scored on the held-out photos (index % 4 == 0) of the classes it never saw, and of
those it saw: cosine to the dense embedding (mean per photo), top-10 neighbour overlap (of each
photo's 10 nearest neighbours among the scored photos under the dense embedding, the share that stay
among its 10 nearest under the model's; cosine similarity), and kNN top-1 (leave-one-out, 10 nearest
by cosine, majority vote with the similarity as weight, the 10 Imagenette classes as labels), for
the dense model, EViT off the shelf, EViT recovered and the dense model recovered the same way
(the control).

    python benchmarks/embed_real.py --train 0-4 --epochs 4 --out benchmarks/results
    python benchmarks/embed_real.py --train 0-4 --train-limit 100 --epochs 0.5 --out /tmp/e  # smoke
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and _finetune, also when run from elsewhere
import _common as c  # noqa: E402
import _finetune  # noqa: E402

K = 10


def parse_args(argv):
    ap = c.Parser(__doc__)
    ap.add_argument("--train", default="0-4", help="Classes recovered on (0..9 in synset order). [0-4]")
    c.add_evit_options(ap)
    _finetune.add_options(ap, None, "Epochs of the recovery. [finetune's default: 4 for an embedding model]")
    ap.add_argument("--no-control", action="store_true", help="Skip the dense model recovered the same way.")
    ap.add_argument("--out", default=str(c.RESULTS), help="Folder for embed_real.{json,md}.")
    args = ap.parse_args(argv)
    c.check_args(ap, args, ("train_limit",))
    try:
        args.classes = c.parse_classes(args.train)
    except ValueError:
        ap.error(f"--train {args.train!r}: expected classes such as 0-4 or 0,2,4 (0..9)")
    if len(args.classes) == 10:
        ap.error("--train must leave at least one class unseen")
    return args


def neighbours(e, k=K):
    import torch.nn.functional as F

    z = F.normalize(e, dim=-1)
    sim = z @ z.T
    sim.fill_diagonal_(-2)
    return sim.topk(k, dim=-1)


def score(e, dense_e, labels) -> dict:
    import torch
    import torch.nn.functional as F

    cos = F.cosine_similarity(e, dense_e, dim=-1)
    own, ref = neighbours(e).indices, neighbours(dense_e).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(own, ref)) / (K * len(e))
    sims, idx = neighbours(e)
    votes = torch.zeros(len(e), 10).scatter_add_(1, labels[idx], sims.clamp_min(0))
    correct = int((votes.argmax(-1) == labels).sum())
    return {"photos": len(e), "cosine": float(cos.mean()), "overlap": 100 * overlap,
            "knn_top1": 100 * correct / len(e), "knn_correct": correct}


def fmt(s: dict) -> str:
    return f"{s['cosine']:.4f} / {s['overlap']:.2f} / {s['knn_top1']:.2f} ({s['photos']})"


def markdown(r: dict) -> str:
    epochs = format(r["epochs"], "g") if r["epochs"] else "its default"
    lines = ["# Headless DeiT-Tiny recovered without labels, scored on classes it never saw (benchmarks/embed_real.py)",
             "",
             f"EViT keep {r['keep']:g} at {r['layers']}; recovered with `evit finetune` ({epochs} epochs"
             f"{', ' + r['finetune_args'] if r['finetune_args'] else ''}) on {r['train_photos']} photos of classes "
             f"{r['train']} (flat folder, 10% held out by finetune for validation). Figures: cosine to the dense "
             f"embedding / top-{K} neighbour overlap with the dense embedding (%) / kNN top-1 (%, {K}-NN "
             f"leave-one-out) "
             "(photos). " + f"{r['machine']}, torch {r['torch']}.", "",
             "| model | classes it saw | classes it never saw | train time (s) |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {fmt(row['seen'])} | {fmt(row['unseen'])} | {row['train_s'] or '-'} |")
    return "\n".join(lines + ["", "Command: `" + r["command"] + "`", ""])


def run(args) -> dict:
    import torch

    import evit_cli

    out = Path(args.out)
    paths = c.photos()
    test_idx = c.held_out(paths, None)
    result = {"keep": args.keep, "layers": args.layers, "epochs": args.epochs, "train": args.train,
              "train_photos": None, "finetune_args": args.finetune_args, "machine": c.machine(),
              "torch": torch.__version__, "command": c.command(__file__), "rows": []}
    with tempfile.TemporaryDirectory(prefix="embed_real.") as tmp:
        work = Path(tmp)
        n_train = result["train_photos"] = c.train_folder(paths, args.classes, args.train_limit, work / "train")
        n_test = len(test_idx)
        runs = 1 if args.no_control else 2
        per_run = n_train * (args.epochs or 4) * 4  # progress units of one recovery (4 per photo and epoch)
        prog = c.Progress((3 + runs) * n_test + runs * per_run)  # decode, scorings, recoveries
        dense = c.dense_model(headless=True)
        classes = torch.tensor(c.class_numbers(paths, test_idx))
        seen = c.seen_mask(paths, test_idx, args.classes)
        cached = c.cached_images(paths, test_idx, dense)
        prog.step(f"decoded {n_test} held-out photos", n_test)
        dense_e = c.outputs(dense, cached)

        def add(name, e, secs=None):
            result["rows"].append({"model": name, "train_s": secs and round(secs),
                                   "seen": score(e[seen], dense_e[seen], classes[seen]),
                                   "unseen": score(e[~seen], dense_e[~seen], classes[~seen])})
            c.write_results(out, "embed_real", result, markdown(result))
            prog.step(f"scored {name} on {n_test} photos", n_test)

        add("dense", dense_e)
        shelf = evit_cli.convert(c.dense_model(headless=True), keep_rate=args.keep, layers=args.layer_list)
        add(f"EViT {args.keep:g} off the shelf", c.outputs(shelf, cached))
        runs = [(f"EViT {args.keep:g} recovered", shelf)]
        if not args.no_control:  # the same recovery of the dense model: what the procedure itself does
            runs.append(("dense recovered (control)",
                         evit_cli.convert(c.dense_model(headless=True), 1.0, args.layer_list)))
        for k, (name, model) in enumerate(runs):
            recovered, secs = _finetune.recover(model, work / "train", work, f"rec{k}", args)
            prog.step(f"{name} on {n_train} photos ({secs:.0f} s)", per_run)
            add(name, c.outputs(recovered, cached), secs)
    return result


def main(argv=None) -> int:
    return c.run_script("embed_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
