"""Coverage: which ViTs a user can bring to `evit convert`.

Shown in docs/models.md, "Coverage" (timm: how many ViT-like names convert and why the others are
refused; transformers: how many ViT-like classes), and in README.md, "Supported models" (the two
counts), from benchmarks/results/coverage.{json,md}. About 15 minutes on the project's 2-core CPU machine.

timm: every name of ``timm.list_models()`` whose model class is ViT-like is
built on the meta device (no weights, no memory), converted at keep rate 0.7
in the paper's layers scaled to its depth, and run once on the meta device;
it counts as converted when the output has the dense model's shape and the
token count after each EViT layer is the one ``evit_cli.tokens_after_layers``
predicts. Otherwise the refusal (or the error) is recorded. Every converted name is then checked with
values: built on the CPU with random weights and two blocks (its own width, heads, tokens, prefix,
position terms and pool), converted at keep 1.0 and run beside its dense copy on one random image; the
largest difference is recorded (``keep_one``).

ViT-like classes: timm's ``VisionTransformer`` and its subclasses (DeiT,
distilled DeiT, hybrid and ViTamin stems), ``Eva``, ``Beit``, and the other
classes that run one token sequence through a stack of transformer blocks:
``VisionTransformerRelPos``, ``VisionTransformerSAM``, ``NaFlexVit``, ``Cait``,
``Xcit``, ``VOLO``, ``CrossVit`` and ``TNT`` (not the pooling-stage
hierarchies: PiT, LeViT, MViTv2, Hiera, Swin). Only the timm modules that
define those classes are walked, to stay fast.

transformers: every model class transformers ships for the model types of its
image auto mappings (image classification and features, zero-shot image
classification, detection, segmentation, depth, masked image modeling,
backbones), and the image towers (``*Vision*`` classes) of the image-text model
types (image-text-to-text, visual question answering). Each is built on the
meta device from its default config; it is ViT-like when one patchify
convolution (kernel = stride), or one linear layer on flattened patches (SigLIP 2),
feeds one flat stack of attention layers of that width (no stage holding a stack of its own: not Swin, Hiera, PVT). Each
ViT-like class is converted as above, and the converted ones run once on the
meta device (on the CPU, from the default config, where the forward reads values: SigLIP 2) with their
token counts checked; a refusal is recorded with its
reason.

    python benchmarks/coverage.py          # about 15 minutes on 2 CPU cores

Writes benchmarks/results/coverage.{json,md} and prints the Markdown.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when run from elsewhere
import _common  # noqa: E402  (puts this checkout first on sys.path)
import torch  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli.errors import EvitError  # noqa: E402

VIT_CLASSES = {"VisionTransformer", "Eva", "Beit", "VisionTransformerRelPos", "VisionTransformerSAM", "NaFlexVit",
               "Cait", "Xcit", "VOLO", "CrossVit", "TNT"}
MODULES = {"vision_transformer", "deit", "vision_transformer_hybrid", "vitamin", "eva", "beit",
           "vision_transformer_relpos", "vision_transformer_sam", "naflexvit", "cait", "xcit", "volo", "crossvit",
           "tnt"}


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
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
             for b in evit_cli.adapters.evit_blocks(model)]
    try:
        with torch.no_grad():
            shape = tuple(model(x).shape)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "crashed", "reason": "forward: " + _one_line(e)}
    finally:
        for h in hooks:
            h.remove()
    if shape != dense_shape or seen != evit_cli.tokens_after_layers(model):
        return {**row, "status": "wrong",
                "reason": f"output {shape} vs {dense_shape}, tokens {seen} vs {evit_cli.tokens_after_layers(model)}"}
    return {**row, "status": "converted", "tokens": [int(s) for s in seen], "keep_one": keep_one(name)}


def keep_one(name: str) -> dict:
    """keep 1.0 against the original, with values: the architecture built on the CPU with random weights and
    two blocks (:func:`two_blocks`; its width, heads, tokens, prefix, position terms and pool as named),
    converted at keep 1.0 in its first two blocks with its default score; the largest difference of its
    output from the dense copy's on one random image (``None`` with the reason where a two-block model cannot be
    built)."""
    try:
        torch.manual_seed(0)
        model = two_blocks(name)
        evit_cli.convert(model, keep_rate=1.0, layers=(1, 2))
        adapter = evit_cli.adapters.get_adapter(model)
        pe = getattr(model, "patch_embed", None)
        size = pe.img_size if hasattr(pe, "img_size") else (adapter.img_size(model),) * 2
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            diff = float((model(x) - evit_cli.dense_copy(model)(x)).abs().max())
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return {"max_diff": None, "reason": _one_line(e)}
    return {"max_diff": diff}


def two_blocks(name: str):
    """``name`` with two blocks (CrossViT: two multi-scale stages; a model whose key/value heads are given per
    block, Sapiens2: those of its first block and of its middle one), or with all of its blocks where its
    entry point takes no depth (crossvit_18_240)."""
    import timm

    kwargs: dict = {"depth": ((1, 1, 0), (1, 1, 0)) if "crossvit" in name else 2}
    try:
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    except AssertionError:  # key/value heads given per block (Sapiens2): those of its first and middle blocks
        with torch.device("meta"):
            kv = [b.attn.num_kv_heads for b in timm.create_model(name, pretrained=False).blocks]
        return timm.create_model(name, pretrained=False, **kwargs, num_kv_heads=(kv[0], kv[len(kv) // 2])).eval()
    except TypeError:  # the entry point passes depth itself
        return timm.create_model(name, pretrained=False).eval()


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


HF_IMAGE_TASKS = ("IMAGE_CLASSIFICATION", "IMAGE", "ZERO_SHOT_IMAGE_CLASSIFICATION", "OBJECT_DETECTION",
                  "ZERO_SHOT_OBJECT_DETECTION", "SEMANTIC_SEGMENTATION", "IMAGE_SEGMENTATION", "INSTANCE_SEGMENTATION",
                  "UNIVERSAL_SEGMENTATION", "DEPTH_ESTIMATION", "MASKED_IMAGE_MODELING", "BACKBONE")
HF_TOWER_TASKS = ("IMAGE_TEXT_TO_TEXT", "VISUAL_QUESTION_ANSWERING")  # only their image towers


def _model_types(tasks) -> set[str]:
    import transformers.models.auto.modeling_auto as auto

    return {t for task in tasks for t in getattr(auto, f"MODEL_FOR_{task}_MAPPING_NAMES")}


def hf_classes() -> list[type]:
    """Every transformers model class of an image model type, and the image towers of image-text ones."""
    import importlib

    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    image, towers = _model_types(HF_IMAGE_TASKS), _model_types(HF_TOWER_TASKS)
    classes = {}
    for model_type in sorted(image | towers):
        try:
            module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
        except Exception:  # noqa: BLE001 - a model type whose module this install lacks
            continue
        for name in dir(module):
            obj = getattr(module, name, None) if not name.startswith("_") else None
            if not (isinstance(obj, type) and issubclass(obj, PreTrainedModel)) or name.endswith("PreTrainedModel"):
                continue
            if "Text" in name or (model_type not in image and "Vision" not in name):
                continue
            classes[name] = obj
    return [classes[n] for n in sorted(classes)]


def _stacks(module) -> list:
    """The flat stacks of attention layers under ``module``: ModuleLists of >= 2 layers of one class,
    each with an attention, whose layers hold no such stack themselves (a stage of Swin does)."""
    from torch import nn

    def is_stack(m) -> bool:
        return (isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1
                and any("attention" in type(x).__name__.lower() or n.endswith(("attn", "attention"))
                        for n, x in m[0].named_modules()))

    stacks = [m for m in module.modules() if is_stack(m)]
    return [s for s in stacks if not any(o is not s and is_stack(o) for o in s[0].modules())]


def hf_vit_like(model) -> bool:
    """One patchify layer (a convolution with kernel = stride, or a linear layer on flattened patches, as in
    SigLIP 2) feeding one flat stack of attention layers of its width, in the smallest module around the
    patchify layer that holds such a stack (the image tower of a CLIP)."""
    from torch import nn

    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.stride[0] > 1
             or isinstance(m, nn.Linear) and n.endswith("patch_embedding")]
    if len(convs) != 1:
        return False
    patchify = model.get_submodule(convs[0])
    width = patchify.out_channels if isinstance(patchify, nn.Conv2d) else patchify.out_features
    parts = convs[0].split(".")
    for depth in range(len(parts) - 1, -1, -1):
        root = model.get_submodule(".".join(parts[:depth]))
        flat = [s for s in _stacks(root)
                if next(x for x in s[0].modules() if isinstance(x, nn.Linear)).in_features == width]
        if flat:
            break
    staged = any(isinstance(m, nn.ModuleList) and m not in flat and _stacks(m) and any(
        isinstance(x, nn.ModuleList) for c in m for x in c.modules()) for m in root.modules())
    return len(flat) == 1 and not staged


def try_transformers(cls) -> dict:
    row = {"name": cls.__name__, "module": cls.__module__.split(".")[2]}
    try:
        with torch.device("meta"):
            model = cls(cls.config_class()).eval()  # as a user runs it (batch norm in a head: running statistics)
    except Exception as e:  # noqa: BLE001 - a class that cannot be built from its default config
        return {**row, "vit_like": None, "status": "not built", "reason": _one_line(e)}
    row["vit_like"] = hf_vit_like(model)
    if not row["vit_like"]:
        return row
    out = convert_and_count(model)
    if "meta tensors" in out.get("reason", ""):  # a forward that reads values (SigLIP 2's patch shapes): on the CPU
        out = {**convert_and_count(cls(cls.config_class()).eval(), "cpu"), "device": "cpu"}
    return {**row, **out}


def convert_and_count(model, device: str = "meta") -> dict:
    """Convert ``model`` at keep 0.7 in the paper's layers and run it once on ``device``: converted when the token
    count after each EViT layer is the predicted one."""
    try:
        adapter = evit_cli.adapters.get_adapter(model)
        evit_cli.convert(model, keep_rate=0.7, layers=paper_layers(adapter.depth(model)))
        x = torch.zeros(1, 3, adapter.img_size(model), adapter.img_size(model), device=device)
    except EvitError as e:
        return {"status": "refused", "reason": str(e)}
    except Exception as e:  # noqa: BLE001
        return {"status": "crashed", "reason": _one_line(e)}
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).shape[1]))
             for b in evit_cli.adapters.evit_blocks(model)]
    try:
        with torch.no_grad():
            adapter.outputs(model, x)
    except Exception as e:  # noqa: BLE001
        return {"status": "crashed", "reason": "forward: " + _one_line(e)}
    finally:
        for h in hooks:
            h.remove()
    if seen != evit_cli.tokens_after_layers(model):
        return {"status": "wrong", "reason": f"tokens {seen} vs {evit_cli.tokens_after_layers(model)}"}
    return {"status": "converted", "tokens": [int(s) for s in seen]}


def transformers_section() -> list[dict]:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return [try_transformers(cls) for cls in hf_classes()]


def markdown(timm_rows: list[dict], hf_rows: list[dict]) -> str:
    if not timm_rows:
        return "\n".join(hf_markdown(hf_rows)) + "\n"
    ok = sum(r["status"] == "converted" for r in timm_rows)
    checked = [r["keep_one"]["max_diff"] for r in timm_rows
               if r["status"] == "converted" and (r.get("keep_one") or {}).get("max_diff") is not None]
    lines = [f"timm: **{ok} of {len(timm_rows)}** ViT-like model names convert ({100 * ok / len(timm_rows):.0f}%); "
             f"{len(checked)} of them checked with values at keep 1.0 against the original (two blocks, random "
             f"weights, CPU): largest difference {max(checked, default=0.0):.1e}.", "",
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
    return "\n".join(lines + ([""] + hf_markdown(hf_rows) if hf_rows else [])) + "\n"


def hf_markdown(rows: list[dict]) -> list[str]:
    vit = [r for r in rows if r.get("vit_like")]
    ok = sum(r["status"] == "converted" for r in vit)
    unbuilt = [r["name"] for r in rows if r.get("vit_like") is None]
    lines = [f"transformers: **{ok} of {len(vit)}** ViT-like classes convert (of {len(rows)} model classes of its "
             f"image model types and image towers; {len(rows) - len(vit) - len(unbuilt)} are not ViT-like, "
             f"{len(unbuilt)} cannot be built from their default config: {', '.join(unbuilt) or 'none'}).", "",
             "| classes | result (first example) |", "|---|---|"]
    kinds, example = Counter(), {}
    for r in vit:
        key = _hf_reason_key(r)
        kinds[key] += 1
        example.setdefault(key, r["name"])
    for key, n in kinds.most_common():
        lines.append(f"| {n} | {key} ({example[key]}) |")
    lines += ["", "| class | result |", "|---|---|"]
    for r in vit:
        lines.append(f"| {r['name']} | {_hf_reason_key(r)} |")
    return lines


def _hf_reason_key(row: dict) -> str:
    """The kind of result: the refusal without the class name and the list of supported families."""
    reason = row.get("reason", "")
    if reason.startswith(row["name"]):
        reason = reason[len(row["name"]):].lstrip(": ")
    return f"{row['status']}{': ' + reason.split(' (supported:')[0] if reason else ''}"


def _reason_key(row: dict) -> str:
    """The kind of refusal: its message without the model's name."""
    reason = row["reason"]
    if row["status"] == "refused" and ") " in reason:
        reason = reason.split(") ", 1)[1]
    return f"{row['status']}: {reason}"


def earlier_timm_rows(out: Path) -> list[dict]:
    """The timm rows of an earlier run in ``out`` (none if there is none)."""
    import json

    path = out / "coverage.json"
    return json.loads(path.read_text())["timm"]["models"] if path.exists() else []


def main() -> None:
    p = _common.Parser(__doc__)
    p.add_argument("--out", default=str(_common.RESULTS), help="Folder for coverage.{json,md}.")
    p.add_argument("--no-transformers", action="store_true", help="Only the timm section.")
    p.add_argument("--no-timm", action="store_true",
                   help="Only the transformers section (the timm section of OUT/coverage.json, if any, is kept).")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    timm_rows = earlier_timm_rows(Path(args.out)) if args.no_timm else timm_section()
    hf_rows = [] if args.no_transformers else transformers_section()
    ok = sum(r["status"] == "converted" for r in timm_rows)
    md = markdown(timm_rows, hf_rows)
    result = {"timm": {"converted": ok, "total": len(timm_rows), "models": timm_rows}, "transformers": hf_rows}
    _common.write_results(Path(args.out), "coverage", result, md, indent=1)
    print(md)


if __name__ == "__main__":
    main()
