"""Coverage: which ViTs a user can bring to `evit convert`.

timm: every name of ``timm.list_models()`` whose model class is ViT-like is
built on the meta device (no weights, no memory), converted at keep rate 0.7
in the paper's layers scaled to its depth, and run once on the meta device;
it counts as converted when the output has the dense model's shape and the
token count after each EViT layer is the one ``evit_cli.tokens_after_layers``
predicts. Otherwise the refusal (or the error) is recorded.

ViT-like classes: timm's ``VisionTransformer`` and its subclasses (DeiT,
distilled DeiT, hybrid and ViTamin stems), ``Eva``, ``Beit``, and the other
classes that run one token sequence through a stack of transformer blocks:
``VisionTransformerRelPos``, ``VisionTransformerSAM``, ``NaFlexVit``, ``Cait``,
``Xcit``, ``VOLO``, ``CrossVit`` and ``TNT`` (not the pooling-stage
hierarchies: PiT, LeViT, MViTv2, Hiera, Swin). Only the timm modules that
define those classes are walked, to stay fast.

transformers: tiny random configs of the vision families users bring, each
converted and run on a 32 px image.

    python benchmarks/coverage.py          # about 2 minutes on 2 CPU cores

Writes benchmarks/results/coverage.{json,md} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

import evit_cli
from evit_cli.errors import EvitError

VIT_CLASSES = {"VisionTransformer", "Eva", "Beit", "VisionTransformerRelPos", "VisionTransformerSAM", "NaFlexVit",
               "Cait", "Xcit", "VOLO", "CrossVit", "TNT"}
MODULES = {"vision_transformer", "deit", "vision_transformer_hybrid", "vitamin", "eva", "beit",
           "vision_transformer_relpos", "vision_transformer_sam", "naflexvit", "cait", "xcit", "volo", "crossvit", "tnt"}


def vit_class(model) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in VIT_CLASSES:
            return cls.__name__
    return None


def paper_layers(depth: int) -> list[int]:
    """The paper's 4, 7, 10 of 12 blocks, scaled to ``depth`` (1-based)."""
    return sorted({min(depth, max(1, round(depth * f / 12))) for f in (4, 7, 10)})


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def try_timm(name: str) -> dict:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    row = {"name": name, "class": vit_class(model)}
    if row["class"] is None:
        return row
    try:
        adapter = evit_cli.adapters.get_adapter(model)
        evit_cli.convert(model, keep_rate=0.7, layers=paper_layers(adapter.depth(model)))
        pe = getattr(model, "patch_embed", None)  # (H, W), not always square; else the adapter's size (NaFlexViT:
        size = pe.img_size if hasattr(pe, "img_size") else (adapter.img_size(model),) * 2  # its pretrained config's)
        x = torch.empty(1, 3, *size, device="meta")
    except EvitError as e:
        return {**row, "status": "refused", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - the benchmark records crashes, it must not stop on one
        return {**row, "status": "crashed", "reason": _one_line(e)}
    with torch.no_grad():
        dense_shape = tuple(evit_cli.dense_copy(model)(x).shape)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in evit_cli.adapters.evit_blocks(model)]
    try:
        with torch.no_grad():
            shape = tuple(model(x).shape)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "crashed", "reason": "forward: " + _one_line(e)}
    finally:
        for h in hooks:
            h.remove()
    if shape != dense_shape or seen != evit_cli.tokens_after_layers(model):
        return {**row, "status": "wrong", "reason": f"output {shape} vs {dense_shape}, tokens {seen} vs {evit_cli.tokens_after_layers(model)}"}
    return {**row, "status": "converted", "tokens": [int(s) for s in seen]}


def timm_section() -> list[dict]:
    import timm
    from timm.models import model_entrypoint

    rows = []
    for name in timm.list_models():
        if model_entrypoint(name).__module__.rsplit(".", 1)[-1] not in MODULES:
            continue
        row = try_timm(name)
        if row.get("class"):
            rows.append(row)
    return rows


def _hf_models():
    from transformers import (BeitConfig, BeitModel, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                              CLIPVisionModelWithProjection, Data2VecVisionConfig, Data2VecVisionModel, Dinov2Config,
                              Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, TimmWrapperConfig,
                              TimmWrapperForImageClassification, ViTMAEConfig, ViTMAEModel, ViTMSNConfig, ViTMSNModel)

    t = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32, patch_size=4)
    clip_v = dict(t)
    return {
        "CLIPVisionModel": lambda: CLIPVisionModel(CLIPVisionConfig(**clip_v)),
        "CLIPVisionModelWithProjection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_v, projection_dim=32)),
        "CLIPModel": lambda: CLIPModel(CLIPConfig(text_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                                   intermediate_size=96), vision_config=clip_v, projection_dim=32)),
        "Dinov2Model": lambda: Dinov2Model(Dinov2Config(**t)),
        "Dinov2WithRegistersModel": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**t, num_register_tokens=4)),
        "ViTMAEModel": lambda: ViTMAEModel(ViTMAEConfig(**t, mask_ratio=0.0)),
        "ViTMSNModel": lambda: ViTMSNModel(ViTMSNConfig(**t)),
        "TimmWrapperForImageClassification": lambda: TimmWrapperForImageClassification(TimmWrapperConfig(
            architecture="vit_tiny_patch16_224", num_labels=10,
            model_args=dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3))),
        "BeitModel": lambda: BeitModel(BeitConfig(**t, use_relative_position_bias=True)),
        "Data2VecVisionModel": lambda: Data2VecVisionModel(Data2VecVisionConfig(**t, use_relative_position_bias=True)),
    }


def transformers_section() -> list[dict]:
    rows = []
    for cls, build in _hf_models().items():
        try:
            model = build().eval()
            evit_cli.convert(model, keep_rate=0.7, layers=(2, 3))
            with torch.no_grad():
                out = model(pixel_values=torch.randn(1, 3, 32, 32)) if cls != "CLIPModel" else model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32))
            del out
            rows.append({"name": cls, "status": "converted"})
        except EvitError as e:
            rows.append({"name": cls, "status": "refused", "reason": str(e)})
        except Exception as e:  # noqa: BLE001
            rows.append({"name": cls, "status": "crashed", "reason": _one_line(e)})
    return rows


def markdown(timm_rows: list[dict], hf_rows: list[dict]) -> str:
    ok = sum(r["status"] == "converted" for r in timm_rows)
    lines = [f"timm: **{ok} of {len(timm_rows)}** ViT-like model names convert ({100 * ok / len(timm_rows):.0f}%).", "",
             "| class | names | converted |", "|---|---|---|"]
    per = defaultdict(Counter)
    for r in timm_rows:
        per[r["class"]][r["status"]] += 1
    for cls, c in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"| {cls} | {sum(c.values())} | {c['converted']} |")
    lines += ["", "Not converted, by reason:", "", "| names | reason (first example) |", "|---|---|"]
    reasons = Counter()
    example = {}
    for r in timm_rows:
        if r["status"] != "converted":
            key = _reason_key(r)
            reasons[key] += 1
            example.setdefault(key, f"{r['name']}: {r['reason']}")
    for key, n in reasons.most_common():
        lines.append(f"| {n} | {example[key]} |")
    hf_ok = sum(r["status"] == "converted" for r in hf_rows)
    lines += ["", f"transformers: **{hf_ok} of {len(hf_rows)}** families convert.", "", "| class | result |", "|---|---|"]
    for r in hf_rows:
        lines.append(f"| {r['name']} | {r['status']}{': ' + r['reason'] if r.get('reason') else ''} |")
    return "\n".join(lines) + "\n"


def _reason_key(row: dict) -> str:
    """The kind of refusal: its message without the model's name."""
    reason = row["reason"]
    if row["status"] == "refused" and ") " in reason:
        reason = reason.split(") ", 1)[1]
    return f"{row['status']}: {reason}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--no-transformers", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    timm_rows = timm_section()
    hf_rows = [] if args.no_transformers else transformers_section()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = sum(r["status"] == "converted" for r in timm_rows)
    (out / "coverage.json").write_text(json.dumps({"timm": {"converted": ok, "total": len(timm_rows), "models": timm_rows},
                                                   "transformers": hf_rows}, indent=1) + "\n")
    md = markdown(timm_rows, hf_rows)
    (out / "coverage.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
