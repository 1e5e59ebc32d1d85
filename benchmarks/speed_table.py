"""The README's speed table: DeiT-S and DeiT-B, EViT at layers 4,7,10, keep rates 0.5-0.9.

Every model of one architecture is timed side by side in one run, interleaved rep by rep
(evit_cli.measure.sweep.sweep), so the speedups are ratios measured under the same conditions.

    python benchmarks/speed_table.py                                  # CPU, fp32, batch 64
    python benchmarks/speed_table.py --device cuda --batch 256 --amp  # GPU, fp16 autocast

Writes benchmarks/results/<device>-b<batch>[-amp].{json,md} and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import evit_cli
from evit_cli.measure.sweep import sweep
from evit_cli.utils.device import describe_device, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224")
    p.add_argument("--keep-rates", default="0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--layers", default="4,7,10")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    dev = resolve_device(args.device)
    rates = [float(r) for r in args.keep_rates.split(",")]
    results = []
    for name in args.models.split(","):
        model = evit_cli.convert(name, keep_rate=1.0, layers=args.layers, pretrained=False)
        r = sweep(model, rates, batch=args.batch, reps=args.reps, device=args.device, amp=args.amp)
        r["model"] = name
        results.append(r)
        print(f"done {name}", flush=True)
    precision = ("fp16" if dev.type == "cuda" else "bf16") + " autocast" if args.amp else "fp32"
    header = (f"{describe_device(dev)}, {precision}, batch {args.batch}, torch {torch.__version__}, "
              f"EViT layers {args.layers}, median of {args.reps} interleaved reps\n\n")
    lines = ["| model | keep rate | GMACs | images/s | speedup |", "|---|---|---|---|---|"]
    for r in results:
        for row in sorted(r["rows"], key=lambda x: -x["keep_rate"] if x["model"] == "evit" else -2):
            label = "dense" if row["model"] == "dense" else f"{row['keep_rate']:g}"
            lines.append(f"| {r['model']} | {label} | {row['gmacs']:.2f} | {row['images_per_s']:.1f} | "
                         f"{row['speedup']:.2f}x |")
    table = header + "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{dev.type}-b{args.batch}{'-amp' if args.amp else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"device": describe_device(dev), "precision": precision,
                                                  "results": results}, indent=2))
    (out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
