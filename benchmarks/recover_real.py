"""Win back what EViT costs on real photos, without labels, through evit's own library.

DeiT-Tiny (../shared/real weights); all photos of ../shared/real/imagenette-val sorted by path;
train on index % 4 != 0 as a FLAT folder (symlinks, no labels), test on index % 4 == 0
(1000-way top-1 through the synset folder names, and agreement with the dense model).

For each keep rate: off the shelf, after 1 and 2 epochs of `evit finetune` with its defaults;
and the control: the dense model distilled from itself the same way (does it win, or adapt to
the photos?). Results: benchmarks/results/recover_real.{json,md}.

    python benchmarks/recover_real.py                    # the full run (about 30-40 min on 2 CPU cores)
    python benchmarks/recover_real.py --subset 200 --keep-rates 0.7 --epochs 1 --out /tmp/rr   # a smoke run

Each variant is a function that takes extra finetune options (a dict of TrainConfig fields), so a
new variant (an oracle, say) is one more function in VARIANTS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli.io.data import IMAGE_SUFFIXES, load_image_data  # noqa: E402
from evit_cli.measure.evaluate import evaluate_models  # noqa: E402
from evit_cli.model.convert import dense_copy  # noqa: E402
from evit_cli.train.run import TrainConfig, finetune  # noqa: E402

REAL = ROOT.parent / "shared" / "real"
WEIGHTS = REAL / "deit_tiny_patch16_224.safetensors"
PHOTOS = REAL / "imagenette-val"
LAYERS = (4, 7, 10)


def split_photos(work: Path, subset: int | None) -> tuple[Path, Path, int, int]:
    """Symlink the training photos into a flat folder and the test photos into synset folders.

    ``subset``: N photos of each, evenly spaced over the sorted list (so every class is in it).
    """
    paths = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    train_idx = [i for i in range(len(paths)) if i % 4]
    test_idx = [i for i in range(len(paths)) if i % 4 == 0]
    if subset is not None:
        train_idx = train_idx[:: max(1, len(train_idx) // subset)][:subset]
        test_idx = test_idx[:: max(1, len(test_idx) // subset)][:subset]
    train, test = work / "train_flat", work / "test"
    train.mkdir()
    for i in train_idx:
        (train / f"{i:05d}_{paths[i].name}").symlink_to(paths[i])
    for i in test_idx:
        (test / paths[i].parent.name).mkdir(parents=True, exist_ok=True)
        (test / paths[i].parent.name / paths[i].name).symlink_to(paths[i])
    return train, test, len(train_idx), len(test_idx)


def base_model(work: Path, keep: float) -> Path:
    """The converted DeiT-Tiny (keep 1.0: the dense model, EViT blocks that keep everything)."""
    model = evit_cli.convert("deit_tiny_patch16_224", keep_rate=keep, layers=LAYERS, checkpoint=str(WEIGHTS))
    return evit_cli.save(model, work / f"deit_tiny_k{keep:g}", overwrite=True)


def distilled(start: Path, train: Path, out: Path, epochs: float, extra: dict) -> Path:
    """`evit finetune START --dataset TRAIN --epochs E` with the tool's defaults, plus ``extra``."""
    cfg = TrainConfig(model=str(start), dataset=str(train), output=str(out), epochs=epochs, bench=False, overwrite=True,
                      **extra)
    finetune(cfg)
    return out


# --------------------------------------------------------------------------- variants: (name, model folder)


def off_the_shelf(ctx: dict, keep: float, epochs: float, extra: dict) -> Path:
    return ctx["base"][keep]


def evit_distilled(ctx: dict, keep: float, epochs: float, extra: dict) -> Path:
    return distilled(ctx["base"][keep], ctx["train"], ctx["work"] / f"evit_k{keep:g}_e{epochs:g}", epochs, extra)


def dense_self_distilled(ctx: dict, keep: float, epochs: float, extra: dict) -> Path:
    """The control: the dense model distilled from itself the same way (keep 1.0)."""
    return distilled(ctx["base"][1.0], ctx["train"], ctx["work"] / f"dense_e{epochs:g}", epochs,
                     {**extra, "keep_rate": 1.0})


def oracle_distilled(ctx: dict, keep: float, epochs: float, extra: dict) -> Path:
    """The same fine-tune, the tokens chosen by the dense model's class attention (--oracle)."""
    return distilled(ctx["base"][keep], ctx["train"], ctx["work"] / f"oracle_k{keep:g}_e{epochs:g}", epochs,
                     {**extra, "oracle": True})


VARIANTS = {"off the shelf": off_the_shelf, "distilled": evit_distilled,
            "distilled, oracle selection": oracle_distilled,
            "dense distilled (control)": dense_self_distilled}


def plan(keeps: list[float], epochs: list[float], control: bool = True,
         oracle: bool = False) -> list[tuple[str, float, float]]:
    rows = [("dense", 1.0, 0)]
    for e in epochs if control else []:
        rows.append(("dense distilled (control)", 1.0, e))
    for k in keeps:
        rows.append(("off the shelf", k, 0))
        rows += [("distilled", k, e) for e in epochs]
        rows += [("distilled, oracle selection", k, e) for e in epochs] if oracle else []
    return rows


def evaluate(folder: Path, dense: torch.nn.Module, test_data, workers: int) -> dict:
    model = evit_cli.load(folder)
    r = evaluate_models({"dense": dense, "model": model}, test_data, batch_size=64, workers=workers)
    return r["model"], r["dense"]


def markdown(result: dict) -> str:
    lines = [
        "# Winning back EViT's accuracy without labels (benchmarks/recover_real.py)",
        "",
        f"DeiT-Tiny (../shared/real), EViT at layers {','.join(map(str, LAYERS))}; trained on {result['train_images']} "
        f"photos as a flat folder (labels unused), tested on {result['test_images']} other photos (1000-way top-1). "
        f"`evit finetune` defaults (distillation from the dense model, AdamW lr 5e-5, wd 0.05, batch 32, "
        f"random-resized crop + flip, cosine); {result['machine']}, torch {result['torch']}.",
        "",
        "| model | keep rate | epochs | top-1 (%) | top-5 (%) | agreement with dense (%) | KL(dense‖model) | train "
        "time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['keep_rate']:g} | {r['epochs']:g} | {r['top1']:.2f} | {r['top5']:.2f} | "
                     f"{r.get('agreement', 100.0):.2f} | {r.get('kl', 0.0):.4f} | {r['train_s']:.0f} |")
    lines += ["", "Command: `" + result["command"] + "`", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-rates", default="0.7,0.5")
    ap.add_argument("--epochs", default="1,2", help="Separate runs, each with its own cosine schedule.")
    ap.add_argument("--subset", type=int, default=None,
                    help="Use only the first N training and N test photos (a smoke run).")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-control", action="store_true", help="Skip the dense model distilled from itself.")
    ap.add_argument("--oracle", action="store_true",
                    help="Also fine-tune with oracle token selection (finetune --oracle).")
    ap.add_argument("--extra", default="{}", help="JSON of extra TrainConfig fields for every fine-tune.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="Folder for recover_real.{json,md}.")
    args = ap.parse_args(argv)
    keeps = [float(k) for k in args.keep_rates.split(",")]
    epochs = [float(e) for e in args.epochs.split(",")]
    extra = {"workers": args.workers, **json.loads(args.extra)}
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recover_real.") as tmp:
        work = Path(tmp)
        train, test, n_train, n_test = split_photos(work, args.subset)
        test_data = load_image_data(str(test), whole_if_no_val=True)
        ctx = {"work": work, "train": train, "base": {k: base_model(work, k) for k in [1.0, *keeps]}}
        dense = dense_copy(evit_cli.load(ctx["base"][1.0]))
        result = {"train_images": n_train, "test_images": n_test, "layers": list(LAYERS), "extra": extra,
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "torch": torch.__version__, "command": "python benchmarks/recover_real.py "
                  + " ".join(argv or sys.argv[1:]),
                  "rows": []}
        for variant, keep, e in plan(keeps, epochs, not args.no_control, args.oracle):
            t0 = time.perf_counter()
            folder = ctx["base"][1.0] if variant == "dense" else VARIANTS[variant](ctx, keep, e, extra)
            train_s = time.perf_counter() - t0
            r, _ = evaluate(folder, dense, test_data, args.workers)
            row = {"variant": variant, "keep_rate": keep, "epochs": e, "train_s": train_s, **r}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "recover_real.json").write_text(json.dumps(result, indent=2) + "\n")
            (out / "recover_real.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
