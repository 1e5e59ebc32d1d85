"""Label-free recovery of an embedding model, scored on classes it never saw.

The headless real DeiT-Tiny (../shared/real weights, num_classes=0: the class-token embedding after
the final norm, timm's pre-logits) is converted to EViT (--keep at --layers) and recovered with
`evit finetune` defaults on a FLAT folder (no labels) of the training photos (index % 4 != 0) of the
--train classes. Scored on the held-out photos (index % 4 == 0) of the classes it never saw, and of
those it saw: cosine to the dense embedding (mean per photo), top-10 neighbour overlap (of each
photo's 10 nearest neighbours among the scored photos under the dense embedding, the share that stay
among its 10 nearest under the model's; cosine similarity), and kNN top-1 (leave-one-out, 10 nearest
by cosine, majority vote with the similarity as weight, the 10 Imagenette classes as labels), for
the dense model, EViT off the shelf and EViT recovered.

    python benchmarks/embed_real.py --train 0-4 --train-limit 500 --epochs 1 --out benchmarks/results
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

K = 10


def parse_args(argv):
    ap = g.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="0-4", help="Classes recovered on (0..9 in synset order). [0-4]")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--layers", default="4,7,10")
    ap.add_argument("--epochs", type=float, default=None,
                    help="Epochs of the recovery. [finetune's default: 4 for an embedding model]")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--finetune-args", default="", help="Extra `evit finetune` options.")
    ap.add_argument("--no-control", action="store_true", help="Skip the dense model recovered the same way.")
    ap.add_argument("--out", default=str(g.ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    g.check_numbers(ap, args, ("train_limit",))
    try:
        args.classes = g.parse_classes(args.train)
        args.layer_list = [int(x) for x in args.layers.split(",")]
    except ValueError:
        ap.error(f"--train {args.train!r} / --layers {args.layers!r}: expected classes such as 0-4, layers such as "
                 f"4,7,10")
    if len(args.classes) == 10:
        ap.error("--train must leave at least one class unseen")
    return args


def headless_dense():
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0)
    weights = {k: v for k, v in load_file(str(g.WEIGHTS)).items() if not k.startswith("head.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def embed(model, cached):
    import torch

    with torch.inference_mode():
        return torch.cat([model.eval()(x.float()).float() for x in cached])


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
        f = lambda s: f"{s['cosine']:.4f} / {s['overlap']:.2f} / {s['knn_top1']:.2f} ({s['photos']})"  # noqa: E731
        lines.append(f"| {row['model']} | {f(row['seen'])} | {f(row['unseen'])} | {row['train_s'] or '-'} |")
    return "\n".join(lines + ["", "Command: `" + r["command"] + "`", ""])


def run(args) -> dict:
    import torch

    import evit_cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = g.photos()
    test_idx = g.held_out(paths, None)
    result = {"keep": args.keep, "layers": args.layers, "epochs": args.epochs, "train": args.train,
              "train_photos": None,
              "finetune_args": args.finetune_args,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "command": "python benchmarks/embed_real.py " + shlex.join(sys.argv[1:]),
              "rows": []}
    with tempfile.TemporaryDirectory(prefix="embed_real.") as tmp:
        work = Path(tmp)
        n_train = result["train_photos"] = g.train_folder(paths, args.classes, args.train_limit, work / "train")
        n_test = len(test_idx)
        runs = 1 if args.no_control else 2
        per_run = n_train * (args.epochs or 4) * 4  # progress units of one recovery (4 per photo and epoch)
        prog = g.Progress((3 + runs) * n_test + runs * per_run)  # decode, scorings, recoveries
        dense = headless_dense()
        classes = torch.tensor([g.SYNSETS.index(paths[i].parent.name) for i in test_idx])
        seen = torch.tensor([int(c) in args.classes for c in classes])
        cached = [x.half() for x in g.eval_images(paths, test_idx, dense, 64)]
        prog.step(f"decoded {n_test} held-out photos", n_test)
        dense_e = embed(dense, cached)

        def add(name, e, secs=None):
            result["rows"].append({"model": name, "train_s": secs and round(secs),
                                   "seen": score(e[seen], dense_e[seen], classes[seen]),
                                   "unseen": score(e[~seen], dense_e[~seen], classes[~seen])})
            (out / "embed_real.json").write_text(json.dumps(result, indent=2) + "\n")
            (out / "embed_real.md").write_text(markdown(result))
            prog.step(f"scored {name} on {n_test} photos", n_test)

        add("dense", dense_e)
        shelf = evit_cli.convert(headless_dense(), keep_rate=args.keep, layers=args.layer_list)
        add(f"EViT {args.keep:g} off the shelf", embed(shelf, cached))
        runs = [(f"EViT {args.keep:g} recovered", shelf)]
        if not args.no_control:  # the same recovery of the dense model: what the procedure itself does
            runs.append(("dense recovered (control)", evit_cli.convert(headless_dense(), 1.0, args.layer_list)))
        for k, (name, model) in enumerate(runs):
            folder = evit_cli.save(model, work / f"start{k}")
            secs = g.finetune([str(folder)], work / "train", work / f"rec{k}", args, work / f"log{k}.txt")
            prog.step(f"{name} on {n_train} photos ({secs:.0f} s)", per_run)
            add(name, embed(evit_cli.load(work / f"rec{k}"), cached), secs)
    return result


def main(argv=None) -> int:
    return g.run_script("embed_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
