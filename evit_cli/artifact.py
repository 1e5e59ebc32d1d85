"""The exported folder: weights plus ``evit.json``; save and load.

A timm model is saved as ``model.safetensors`` (timm's own state-dict keys)
and ``evit.json``, which says how to rebuild the architecture and where the
EViT layers are. Loading needs nothing but the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from . import __version__, adapters
from .config import EViTConfig
from .core import convert, get_config, tokens_after_layers
from .errors import EvitError
from .fsutil import atomic_dir, write_json

META_FILE = "evit.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def source_of(model: nn.Module) -> dict:
    """How to rebuild ``model``'s architecture: recorded by the loader, or derived for a plain timm model."""
    src = getattr(model, "evit_source", None)
    if src is not None:
        return src
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if adapters.get_adapter(model).name != "timm" or arch is None:
        raise EvitError("cannot tell how to rebuild this model: build it with evit_cli.load_model(name, ...) before converting")
    adapter = adapters.get_adapter(model)
    kwargs = {"num_classes": int(model.num_classes), "img_size": adapter.img_size(model)}
    return {"family": "timm", "model": arch, "kwargs": kwargs, "pretrained": None, "checkpoint": None}


def metadata(model: nn.Module, extra: dict | None = None) -> dict:
    adapter = adapters.get_adapter(model)
    cfg = get_config(model)
    meta = {
        "format": "evit",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "family": adapter.name,
        "source": source_of(model),
        "num_classes": int(getattr(model, "num_classes", 0) or 0),
        "img_size": adapter.img_size(model),
        "num_prefix_tokens": adapter.num_prefix_tokens(model),
        "num_tokens": adapter.num_tokens(model),
        "evit": cfg.to_dict() if cfg else None,
        "token_counts": tokens_after_layers(model),
    }
    if adapter.name == "timm":
        from timm.data import resolve_data_config

        meta["data_config"] = resolve_data_config(model=model)
    meta.update(extra or {})
    return meta


def save(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Export ``model`` to ``folder`` atomically: the folder appears complete or not at all."""
    from safetensors.torch import save_file

    meta = metadata(model, extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(folder, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / META_FILE, meta)
    return Path(folder)


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise EvitError(f"{folder} has no {META_FILE}: give a folder written by `evit convert`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvitError(f"{path} is not valid JSON ({e}): export the model again") from None
    if meta.get("format") != "evit":
        raise EvitError(f"{path} is not an evit export file")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise EvitError(f"{folder} was written by a newer evit (format {meta['format_version']}): upgrade evit-cli")
    return meta


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the EViT model of an exported folder, from the folder alone."""
    from .loading import create_timm, load_state_dict, load_weights

    folder = Path(folder)
    meta = read_meta(folder)
    src = meta["source"]
    if meta["family"] != "timm":
        raise EvitError(f"{folder}: unknown model family {meta['family']!r}")
    model = create_timm(src["model"], pretrained=False, **src.get("kwargs", {}))
    load_weights(model, load_state_dict(folder / WEIGHTS_FILE), f"{folder / WEIGHTS_FILE}")
    model.evit_source = src
    if meta.get("class_names"):
        model.evit_class_names = meta["class_names"]
    if meta.get("evit"):
        cfg = EViTConfig.from_dict(meta["evit"])
        convert(model, keep_rate=cfg.keep_rates, layers=cfg.layers, fuse=cfg.fuse)
    return model.eval()
