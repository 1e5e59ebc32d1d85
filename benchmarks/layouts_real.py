"""The real DeiT-Tiny in other libraries' layouts, converted by evit, against evit's timm path.

The ../shared/real weights are mapped (by the tests' own independent mappers) into:
- the hub layout of facebook/deit-tiny-patch16-224 (transformers ViT), and
- transformers' Data2Vec-vision layout (its older nested layers; absolute positions, no layer scale),
and each is converted with keep rate 0.7 at layers 4,7,10, as is the timm model. On the same pixels
(the timm model's preprocessing) of every photo of ../shared/real/imagenette-val it reports how often
the top-1 agrees with the timm path, on how many photos a logit differs by more than 1e-3, and how far
the dense models differ. Results: benchmarks/results/layouts_real.{json,md}.

    python benchmarks/layouts_real.py               # all 3925 photos, about 20 min on 2 CPU cores
    python benchmarks/layouts_real.py --limit 256   # a quick run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from test_transformers_real import WEIGHTS, batch, data2vec_deit_tiny, hub_folder, photos  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli.model.convert import dense_copy  # noqa: E402

LAYERS, KEEP = (4, 7, 10), 0.7


def compare(models: dict, timm_evit, files, batch_size: int) -> list[dict]:
    """Each converted model of another layout against the timm path, EViT and dense, on the same batches."""
    pairs = {name: (evit, dense_copy(evit)) for name, evit in models.items()}
    timm_dense = dense_copy(timm_evit)
    stats = {name: {"top1_agree": 0, "logit_diff_over_1e-3": 0, "dense_max_logit_diff": 0.0} for name in models}
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            x = batch(timm_evit, files[i:i + batch_size])
            ref, ref_dense = timm_evit(x), timm_dense(x)
            for name, (evit, dense) in pairs.items():
                a, st = evit(x).logits, stats[name]
                st["top1_agree"] += int((a.argmax(1) == ref.argmax(1)).sum())
                st["logit_diff_over_1e-3"] += int(((a - ref).abs().amax(1) > 1e-3).sum())
                st["dense_max_logit_diff"] = max(st["dense_max_logit_diff"],
                                                 float((dense(x).logits - ref_dense).abs().max()))
            print(f"{min(i + batch_size, len(files))}/{len(files)} photos", flush=True)
    return [{"layout": name, "photos": len(files), **stats[name], "tokens": evit_cli.tokens_after_layers(models[name])}
            for name in models]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=_positive, default=None, help="photos, spread over the classes (default: all)")
    ap.add_argument("--batch", type=_positive, default=128, help="photos per forward pass (default: 128)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    files = photos(args.limit)
    timm_evit = evit_cli.convert("deit_tiny_patch16_224", checkpoint=WEIGHTS, keep_rate=KEEP, layers=LAYERS)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"transformers ViT (facebook/deit-tiny-patch16-224 hub layout)":
                  evit_cli.convert(hub_folder(Path(tmp) / "deit-tiny"), keep_rate=KEEP, layers=LAYERS)}
    for attn in ("sdpa", "eager"):
        models[f"transformers Data2Vec-vision, {attn}"] = evit_cli.convert(data2vec_deit_tiny(attn), keep_rate=KEEP,
                                                                           layers=LAYERS)
    rows = compare(models, timm_evit, files, args.batch)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    result = {"keep_rate": KEEP, "layers": list(LAYERS), "machine": machine, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layouts_real.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Keep {KEEP} at layers {','.join(map(str, LAYERS))}, against evit's timm path; {machine}. "
             "The hub config's LayerNorm eps is 1e-12 (timm's 1e-6), so its logits differ a little more.", "",
             "| layout | photos | top-1 agrees | logit diff > 1e-3 | dense max logit diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['photos']} | {r['top1_agree']} | {r['logit_diff_over_1e-3']} | "
              f"{r['dense_max_logit_diff']:.1e} |" for r in rows]
    (args.out / "layouts_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the results are written only at the end: nothing half-written is left
        sys.exit("interrupted")
