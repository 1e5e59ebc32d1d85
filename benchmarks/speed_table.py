"""The README's speed table: DeiT-S and DeiT-B, EViT at layers 4,7,10, keep rates 0.5-0.9.

Shown in docs/benchmarks.md, "DeiT-S on a CPU": the table after "Keep rates 0.5-0.9 for DeiT-S and
DeiT-B" (and its 1.56x quoted above it), and in README.md's first table (the DeiT-S images/s rows),
from benchmarks/results/cpu-b64.{json,md}. Random weights
(nothing to download). On the project's 2-core CPU machine, fp32 batch 64, about 6 minutes when the
machine is quiet (1 warm-up and 3 interleaved reps of 6 models each: about 70 s per pass for DeiT-B,
18 s for DeiT-S); longer when other work shares the cores.

Every model of one architecture is timed side by side in one run, interleaved rep by rep
(evit_cli.measure.sweep.sweep), so the speedups are ratios measured under the same conditions.

    python benchmarks/speed_table.py                                  # CPU, fp32, batch 64
    python benchmarks/speed_table.py --device cuda --batch 256 --amp  # GPU, bf16 autocast (fp16 before Ampere)

Writes benchmarks/results/<device>-b<batch>[-amp].{json,md} and prints the Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when run from elsewhere
import _common  # noqa: E402  (puts this checkout first on sys.path)
import torch  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli.measure.sweep import sweep  # noqa: E402
from evit_cli.utils.device import amp_dtype, describe_device, resolve_device  # noqa: E402


def main() -> None:
    p = _common.Parser(__doc__)
    p.add_argument("--models", default="deit_small_patch16_224,deit_base_patch16_224",
                   help="timm names, comma-separated, built with random weights. [DeiT-S,DeiT-B]")
    p.add_argument("--keep-rates", default="0.5,0.6,0.7,0.8,0.9", help="EViT keep rates. [0.5,0.6,0.7,0.8,0.9]")
    p.add_argument("--layers", default="4,7,10", help="1-based EViT layers. [4,7,10]")
    p.add_argument("--batch", type=int, default=64, help="Images per timed pass. [64]")
    p.add_argument("--reps", type=int, default=3, help="Interleaved timed reps (the median is reported). [3]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... [cpu]")
    p.add_argument("--amp", action="store_true", help="Autocast in bf16 where the device has it, else fp16.")
    p.add_argument("--out", default=str(_common.RESULTS), help="Folder for <device>-b<batch>[-amp].{json,md}.")
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
    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    precision = f"{half.get(amp_dtype(dev), amp_dtype(dev))} autocast" if args.amp else "fp32"
    header = (f"{describe_device(dev)}, {precision}, batch {args.batch}, torch {torch.__version__}, "
              f"EViT layers {args.layers}, median of {args.reps} interleaved reps\n\n")
    lines = ["| model | keep rate | GMACs | images/s | speedup |", "|---|---|---|---|---|"]
    for r in results:
        for row in sorted(r["rows"], key=lambda x: -x["keep_rate"] if x["model"] == "evit" else -2):
            label = "dense" if row["model"] == "dense" else f"{row['keep_rate']:g}"
            lines.append(f"| {r['model']} | {label} | {row['gmacs']:.2f} | {row['images_per_s']:.1f} | "
                         f"{row['speedup']:.2f}x |")
    table = header + "\n".join(lines) + "\n"
    stem = f"{dev.type}-b{args.batch}{'-amp' if args.amp else ''}"
    _common.write_results(Path(args.out), stem, {"device": describe_device(dev), "precision": precision,
                                                 "results": results}, table)
    print(table)


if __name__ == "__main__":
    main()
