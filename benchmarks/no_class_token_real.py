"""Token scores that need no class token, measured on the real DeiT-Tiny with its class token present but
not read for ranking.

Chooses the default score of towers without a class token (`evit_cli.convert(..., score=...)`, see
docs/algorithm.md, "Towers without a class token"), from benchmarks/results/no_class_token_real.{json,md}.
DeiT-Tiny (../shared/real weights) on every photo of ../shared/real/imagenette-val (3925, sorted by
path; --limit N takes N evenly spaced), preprocessed as in benchmarks/training_free_real.py (PIL bicubic
resize 256, centre crop 224). For each score (`cls`: the paper's class-attention ranking, beside
`mean_query`: the attention row of the mean query, and `received`: the attention each token receives
from all queries) at keep 0.5, 0.6, 0.7, 0.8 and 0.9 at layers 4,7,10:

- 1000-way top-1, agreement with the dense model's top-1 and mean KL(dense || model), on every photo
  run and on the held-out ones (index % 4 == 0, the photos the other benchmarks score on);
- counted GMACs of the DeiT-Tiny model (`evit_cli.model.macs.count_macs`; the received score's N x N
  products included);
- the measured speedup of the same setting on DeiT-Small (random weights, fp32, CPU) at batch 64 and at
  batch 1, timed beside the dense model (median of --reps; --no-speed skips it).

Every row holds the exact `evit_cli.convert` keywords under "convert"; the row of the default score for
towers without a class token (`evit_cli.algorithm.config.NO_CLASS_TOKEN_SCORE`) at keep 0.7 at 4,7,10
is marked "recommended". On the project's 2-core CPU machine: about 1.5 to 3 minutes per row on all
photos (16 rows), plus about 1.5 minutes of timing per row at --reps 5.

    python benchmarks/no_class_token_real.py --out benchmarks/results
    python benchmarks/no_class_token_real.py --speed-only --out benchmarks/results  # time a --no-speed run again
    python benchmarks/no_class_token_real.py --limit 64 --no-speed --out /tmp/t  # smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when run from elsewhere
import _common as c  # noqa: E402
from training_free_real import load_photo, normalize  # noqa: E402

STEM = "no_class_token_real"
SPEED_MODEL = "deit_small_patch16_224"
SCORES = ("cls", "mean_query", "received")
RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
LAYERS = [4, 7, 10]


def parse_args(argv):
    ap = c.Parser(__doc__)
    ap.add_argument("--limit", type=int, default=None, help="At most N photos, evenly spaced (all: 3925).")
    ap.add_argument("--held-out-only", action="store_true",
                    help="Run only the held-out photos (index %% 4 == 0: 982), --limit of them.")
    ap.add_argument("--scores", default=",".join(SCORES), help=f"Which scores to run. [{','.join(SCORES)}]")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="Keep rates at 4,7,10. [0.5,...,0.9]")
    c.add_speed_options(ap, STEM)
    ap.add_argument("--batch", type=int, default=64, help="Batch size of the DeiT-Tiny passes. [64]")
    ap.add_argument("--out", default=str(c.RESULTS), help=f"Folder for {STEM}.{{json,md}}.")
    args = ap.parse_args(argv)
    c.check_args(ap, args, ("limit", "reps", "batch", "threads"))
    args.score_list = [s for s in args.scores.split(",") if s]
    if not args.score_list or any(s not in SCORES for s in args.score_list):
        ap.error(f"--scores {args.scores!r}: expected some of {','.join(SCORES)}, comma-separated")
    try:
        args.rate_list = [float(r) for r in args.rates.split(",")]
    except ValueError:
        ap.error(f"--rates {args.rates!r}: expected keep rates such as 0.5,0.7")
    if not args.rate_list or any(not 0 < r <= 1 for r in args.rate_list):
        ap.error(f"--rates {args.rates!r}: each keep rate must be in (0, 1]")
    return args


def settings(scores: list[str], rates: list[float]) -> list[dict]:
    """One spec per row: score, settings (as the table shows them), convert (evit_cli.convert's keywords)."""
    from evit_cli.algorithm.config import NO_CLASS_TOKEN_SCORE

    specs = [{"score": None, "settings": "dense", "convert": None, "recommended": False}]
    for score in scores:
        specs += [{"score": score, "settings": f"{score}, {rate:g} at 4,7,10",
                   "convert": {"keep_rate": rate, "layers": list(LAYERS), "score": score},
                   "recommended": score == NO_CLASS_TOKEN_SCORE and rate == 0.7} for rate in rates]
    return specs


def build(spec: dict, model):
    import evit_cli

    return model if spec["convert"] is None else evit_cli.convert(model, **spec["convert"])


def logits_of(model, images, batch: int):
    import torch

    with torch.inference_mode():
        return torch.cat([model(normalize(images[s:s + batch])).float() for s in range(0, len(images), batch)])


def speed(spec: dict, dense, reps: int) -> dict:
    """Speedup of ``spec`` on DeiT-Small at batch 64 and 1 against ``dense`` (``_common.side_by_side``)."""
    import timm
    import torch

    torch.manual_seed(0)
    return c.side_by_side(dense, build(spec, timm.create_model(SPEED_MODEL, pretrained=False).eval()), reps)


def retime(args) -> dict:
    """--speed-only: the speedups of every row of an earlier run measured again, the rest kept."""
    import timm
    import torch

    torch.manual_seed(0)
    small = timm.create_model(SPEED_MODEL, pretrained=False).eval()
    return c.retime(args, __file__, STEM, lambda x, _: x["convert"] and speed(x, small, args.reps), markdown)


def measure(spec: dict, images, ref: dict, args) -> dict:
    """One row: the DeiT-Tiny figures on every photo run and on the held-out ones, GMACs, speedups."""
    import torch

    from evit_cli.model.macs import count_macs

    model = build(spec, c.dense_model())
    t0 = time.perf_counter()
    logits = logits_of(model, images, args.batch)
    every = torch.ones(len(logits), dtype=torch.bool)
    pick = ("photos", "top1", "agreement", "kl")
    row = {**spec, "gmacs": round(count_macs(model, 224) / 1e9, 4),
           **{k: v for k, v in c.score(logits, ref["logits"], ref["labels"], every).items() if k in pick},
           "held_out": {k: v for k, v in c.score(logits, ref["logits"], ref["labels"], ref["held"]).items()
                        if k in pick}}
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    if spec["convert"] is None:
        row.update(speedup_b64=1.0, speedup_b1=1.0)
    elif args.no_speed:
        row.update(speedup_b64=None, speedup_b1=None)
    else:
        row.update(speed(spec, ref["small"], args.reps))
    return row


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def others(x: dict) -> dict:
    """A row's figures on the photos that are not held out (every photo run less the held-out ones)."""
    n, h = x["photos"], x["held_out"]["photos"]
    return {k: (x[k] * n - x["held_out"][k] * h) / (n - h) for k in ("top1", "agreement", "kl")} if n > h else {}


def markdown(r: dict) -> str:
    timing = f"median of {r['reps']}" if r["reps"] else "not timed"
    lines = [f"# Token scores without a class token (benchmarks/{STEM}.py)", "",
             f"DeiT-Tiny (../shared/real) on {r['images']} Imagenette photos of ImageNet val ({r['held_out']} "
             "held out: index % 4 == 0; the others: the rest), 1000-way, keep rates at layers 4,7,10. Top-1 (%), "
             "agreement with the dense model (%), KL(dense‖·); speedup of the same setting on DeiT-Small (random "
             f"weights, fp32, {timing}) at batch 64 and 1. {r['machine']}, torch {r['torch']}.", "",
             "| score | setting | GMACs | all: top-1 / agr. / KL | held out | others | speedup b64 / b1 |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        name = x["settings"] + (" (recommended)" if x["recommended"] else "")
        cells = [f"{s['top1']:.2f} / {s['agreement']:.1f} / {s['kl']:.3f}" if s else "-"
                 for s in (x, x["held_out"], others(x))]
        lines.append(f"| {x['score'] or 'dense'} | {name} | {x['gmacs']:.3f} | " + " | ".join(cells)
                     + f" | {fmt(x['speedup_b64'], '.2f')} / {fmt(x['speedup_b1'], '.2f')} |")
    return "\n".join(lines + ["", "Command: `" + r["command"] + "`", *c.timing_note(r), ""])


def run(args) -> dict:
    import platform

    import timm
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = c.photos()
    idx = c.held_out(paths, args.limit) if args.held_out_only else c.spread(list(range(len(paths))), args.limit)
    specs = settings(args.score_list, args.rate_list)
    prog = c.Progress(len(idx) + len(specs) * (len(idx) + (0 if args.no_speed else 300 * args.reps)))
    images = torch.stack([load_photo(paths[i]) for i in idx])
    prog.step(f"decoded {len(idx)} photos", len(idx))
    small = None
    if not args.no_speed:
        torch.manual_seed(0)
        small = timm.create_model(SPEED_MODEL, pretrained=False).eval()
    ref = {"labels": c.labels_of(paths, idx), "held": torch.tensor([i % 4 == 0 for i in idx]),
           "logits": logits_of(c.dense_model(), images, args.batch), "small": small}
    result = {"command": c.command(__file__), "machine": c.machine(), "torch": torch.__version__,
              "python": platform.python_version(), "images": len(idx), "held_out": int(ref["held"].sum()),
              "reps": None if args.no_speed else args.reps, "rows": []}
    for spec in specs:
        result["rows"].append(measure(spec, images, ref, args))
        c.write_results(Path(args.out), STEM, result, markdown(result))
        prog.step(spec["settings"], len(idx) + (0 if args.no_speed or spec["convert"] is None else 300 * args.reps))
    return result


def main(argv=None) -> int:
    return c.run_script(__file__, parse_args, lambda a: retime(a) if a.speed_only else run(a), markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
