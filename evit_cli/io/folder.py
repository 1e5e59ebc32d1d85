"""The exported folder: weights plus ``evit.json`` and a model card; save and load.

- timm: ``model.safetensors`` (timm's own state-dict keys) and ``evit.json``,
  which says how to rebuild the architecture.
- transformers: what ``save_pretrained`` writes (``config.json`` +
  ``model.safetensors``, readable by ``from_pretrained`` as the dense model),
  plus ``evit.json``.
- timm in transformers' TimmWrapper layout (``layout="transformers"``): timm's
  hub ``config.json`` (model type ``timm_wrapper``) and the weights under
  ``timm_model.``, plus ``evit.json``.

The transformers layouts also carry their modeling code (:mod:`.bundle`,
``auto_map`` in ``config.json``): ``from_pretrained(folder, trust_remote_code=True)``
gives the EViT model without evit installed. Every folder gets a ``README.md``
model card. Loading needs nothing but the folder (or its hub repository).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .. import adapters
from .._version import __version__
from ..adapters.swap import original
from ..algorithm.config import EViTConfig
from ..algorithm.state import model_state
from ..errors import EvitError
from ..model import validate
from ..model.convert import convert_module, get_config, tokens_after_layers
from ..utils.files import atomic_dir, read_json, write_json, write_text
from . import bundle
from .card import model_card, training_summary, weights_of
from .hub import META_FILE, locate
from .resolve import create_timm, create_transformers, load_state_dict, load_weights

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
LAYOUTS = ("timm", "transformers")  # a timm model's: timm's own, or transformers' TimmWrapper
WRAPPER_PREFIX = "timm_model."  # TimmWrapper's key prefix of the timm model's weights


def source_of(model: nn.Module) -> dict:
    """How to rebuild ``model``'s architecture: recorded by the loader, or derived from the model."""
    src = model_state(model).source
    if src is not None:
        return src
    adapter = adapters.get_adapter(model)
    if adapter.name == "transformers":
        return {"family": "transformers", "model": getattr(model, "name_or_path", "") or None,
                "class": original(type(model)).__name__, "pretrained": None, "checkpoint": None}
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if arch is None:
        raise EvitError("cannot tell how to rebuild this model: build it with evit_cli.load_model(name, ...) before "
                        "converting")
    kwargs = {"num_classes": int(model.num_classes), "img_size": adapter.img_size(model)}
    _check_rebuilds(model, arch, kwargs)
    return {"family": "timm", "model": arch, "kwargs": kwargs, "pretrained": None, "checkpoint": None}


def _check_rebuilds(model: nn.Module, arch: str, kwargs: dict) -> None:
    """Refuse to save a timm model built by hand that ``arch`` with ``kwargs`` would not rebuild (other
    arguments of ``timm.create_model``, such as ``patch_size`` or ``global_pool``, are not recorded)."""
    import timm
    import torch

    with torch.device("meta"):
        rebuilt = timm.create_model(arch, pretrained=False, **kwargs)
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (model, rebuilt)]
    if shapes[0] != shapes[1]:
        raise EvitError(f"cannot save this {arch}: it was built with arguments of timm.create_model evit did not "
                        "record, so the folder would not rebuild it; build it with evit_cli.load_model(name, "
                        "pretrained=False, **kwargs) (or evit_cli.convert(name, ...)), which records them")


def metadata(model: nn.Module, extra: dict | None = None) -> dict:
    adapter = adapters.get_adapter(model)
    cfg = get_config(model)
    meta = {
        "format": "evit",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "family": adapter.name,
        "source": source_of(model),
        "num_classes": adapter.num_classes(model),
        "class_names": adapter.class_names(model),
        "img_size": adapter.img_size(model),
        "num_prefix_tokens": adapter.num_prefix_tokens(model),
        "num_tokens": adapter.num_tokens(model),
        "evit": cfg.to_dict() if cfg else None,
        "token_counts": tokens_after_layers(model),
        "data_config": adapter.data_config(model),
        "training": model_state(model).training,  # how it was fine-tuned; None: not
    }
    meta.update(extra or {})
    return meta


def save(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None,
         layout: str | None = None) -> Path:
    """Export ``model`` to ``folder`` atomically: the folder appears complete or not at all.

    ``layout="transformers"`` writes a timm model in transformers' TimmWrapper layout; a
    transformers model is always written in its own."""
    meta = metadata(model, extra)
    check_layout(layout)
    if meta["family"] == "transformers" and layout == "timm":
        raise EvitError("a transformers model is written in transformers' layout: drop --layout timm")
    with atomic_dir(folder, overwrite) as tmp:
        if meta["family"] == "transformers":
            _save_transformers(model, tmp, meta)
        elif layout == "transformers":
            _save_timm_wrapper(model, tmp, meta)
        else:
            _save_weights(model.state_dict(), tmp)
        write_json(tmp / META_FILE, meta)
        write_text(tmp / CARD_FILE, model_card(meta))
    return Path(folder)


def check_layout(layout: str | None) -> None:
    if layout not in (None, *LAYOUTS):
        raise EvitError(f"unknown layout {layout!r}: use --layout {' or '.join(LAYOUTS)}")


def _save_weights(state: dict, tmp: Path, prefix: str = "") -> None:
    from safetensors.torch import save_file

    state = {prefix + k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})


def _save_transformers(model: nn.Module, tmp: Path, meta: dict) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(str(tmp), safe_serialization=True)
    config = json.loads((tmp / "config.json").read_text())  # transformers names the class it saved: EViT may have
    config["architectures"] = [original(type(model)).__name__]  # swapped the model's (a weighted pool), not its own
    write_json(tmp / "config.json", config)
    proc = model_state(model).preprocessor
    if proc:
        write_json(tmp / "preprocessor_config.json", proc)
    entry = "evit_cli.io.remote_timm" if adapters.get_adapter(model) is adapters.TIMM_WRAPPER else "evit_cli.io.remote"
    _ship_code(tmp, meta, original(type(model)).__name__, entry)


def _save_timm_wrapper(model: nn.Module, tmp: Path, meta: dict) -> None:
    """timm's hub config (what TimmWrapperConfig reads) with transformers' model type, the weights under
    ``timm_model.``, and the TimmWrapper modeling code."""
    from timm.models._hub import save_config_for_hf

    args = {k: v for k, v in (meta["source"].get("kwargs") or {}).items() if k != "num_classes"}
    labels = {"label_names": meta["class_names"]} if meta["class_names"] else None
    save_config_for_hf(model, str(tmp / "config.json"), model_config=labels, model_args=args)
    cls = "TimmWrapperForImageClassification" if meta["num_classes"] else "TimmWrapperModel"
    config = json.loads((tmp / "config.json").read_text())
    config["model_args"] = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    write_json(tmp / "config.json", {**config, "model_type": "timm_wrapper", "architectures": [cls]})
    _save_weights(model.state_dict(), tmp, WRAPPER_PREFIX)
    meta["layout"] = "transformers"
    _ship_code(tmp, meta, cls, "evit_cli.io.remote_timm")


# the transformers Auto class of each dense-prediction head (adapters/transformers/dense.py); a backbone
# through AutoModel: AutoBackbone.from_pretrained asks the hub about every path, local folders included
DENSE_AUTO = {"Backbone": "AutoModel", "ForDepthEstimation": "AutoModelForDepthEstimation",
              "ForSemanticSegmentation": "AutoModelForSemanticSegmentation"}


def _ship_code(tmp: Path, meta: dict, model_class: str, entry: str) -> None:
    """The modeling code, and ``config.json``'s pointer to it (see :mod:`.bundle`)."""
    auto = "AutoModelForImageClassification" if meta["num_classes"] else "AutoModel"
    auto = next((a for end, a in DENSE_AUTO.items() if model_class.endswith(end)), auto)
    meta["remote_code"] = bundle.write(tmp, entry)
    meta["auto_class"] = auto
    bundle.add_auto_map(tmp / "config.json", auto, model_class, meta["evit"], _zero_shot(model_class))


def _zero_shot(model_class: str) -> tuple[str, ...]:
    """The zero-shot Auto class too, for an image-text model (CLIP, SigLIP), so that
    ``pipeline("zero-shot-image-classification", folder, trust_remote_code=True)`` runs the EViT model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    return ("AutoModelForZeroShotImageClassification",) if model_class in names.values() else ()


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise EvitError(f"{folder} has no {META_FILE}: give a folder written by `evit convert`")
    meta = read_json(path, META_FILE, fix="export the model again")
    if meta.get("format") != "evit":
        raise EvitError(f"{path} is not an evit export file")
    missing = [k for k in ("family", "source", "num_classes", "img_size", "num_tokens", "tool_version")
               if k not in meta]
    if missing or not isinstance(meta["source"], dict):
        raise EvitError(f"{path} is incomplete (missing {', '.join(missing) or 'source'}): export the model again")
    validate.export_meta(path, meta)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise EvitError(f"{folder} was written by a newer evit (format {meta['format_version']}): upgrade evit-cli")
    return meta


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the EViT model of an exported folder, from the folder alone; or of its hub repository
    (``org/name``, from the hub or its local cache)."""
    folder = locate(str(folder))
    meta = read_meta(folder)
    src = meta["source"]
    if meta["family"] == "timm":
        if not (folder / WEIGHTS_FILE).is_file():
            raise EvitError(f"{folder} has no {WEIGHTS_FILE} file (its weights): export the model again")
        model = create_timm(src["model"], pretrained=False, **src.get("kwargs", {}))
        state = load_state_dict(folder / WEIGHTS_FILE)
        if meta.get("layout") == "transformers":  # TimmWrapper's keys
            state = {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}
        load_weights(model, state, f"{folder / WEIGHTS_FILE}")
        if meta.get("class_names"):
            model_state(model).class_names = meta["class_names"]
    elif meta["family"] == "transformers":
        model = create_transformers(str(folder), folder=folder, pretrained=True)
    else:
        raise EvitError(f"{folder}: unknown model family {meta['family']!r}")
    state = model_state(model)
    state.source, state.training = src, meta.get("training")
    if meta.get("evit"):
        cfg = EViTConfig.from_dict(meta["evit"])
        convert_module(model, keep_rate=cfg.keep_rates, layers=cfg.layers, fuse=cfg.fuse,
                proportional_attention=cfg.proportional, method=cfg.method, score=cfg.score, restore=cfg.restore)
    return model.eval()


def folder_summary(folder: str | os.PathLike) -> dict:
    """What an exported folder holds: source, layers, keep rates, token counts, GMACs, and the
    metrics of `evit finetune` and the speedup of `evit bench` when they wrote theirs into it."""
    meta = read_meta(folder)
    e = meta.get("evit") or {}
    result = {
        "folder": str(folder), "family": meta["family"], "source": meta["source"].get("model"),
        "weights": weights_of(meta), "training": training_summary(meta),
        "num_classes": meta["num_classes"], "img_size": meta["img_size"], "layers": e.get("layers"),
        "keep_rates": e.get("keep_rates"), "fuse": e.get("fuse"), "score": e.get("score", "cls") if e else None,
        "method": e.get("method", "evit") if e else None,
        "restore": EViTConfig.from_dict(e).restore.text() if e.get("restore") else None,
        "tokens": [meta["num_tokens"]] + list(meta.get("token_counts") or []),
        "gmacs_dense": meta.get("gmacs_dense"), "gmacs": meta.get("gmacs"), "tool_version": meta["tool_version"],
    }
    metrics, bench = Path(folder) / "metrics.json", Path(folder) / "bench.json"
    if metrics.is_file():
        data = read_json(metrics, "metrics (evit finetune)")
        keys = ("agreement", "kl", "cosine", "neighbour_overlap", "knn_top1", "top1", "top5", "val_loss", "epoch",
                "split")
        result["metrics"] = {k: data[k] for k in keys if k in data}
    if bench.is_file():
        data = read_json(bench, "benchmark (evit bench)")
        keys = (("speedup", "speedup"), ("batch", "batch"), ("device", "device_name"))
        result["bench"] = {name: data[k] for name, k in keys if k in data}
    return result
