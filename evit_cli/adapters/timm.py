"""EViT for timm Vision Transformers: every family spec'd in ``timm_families``.

Like ToMe's patches, the chosen blocks get a subclass swapped in
(``__class__``), so parameters and state-dict keys stay those of timm; the
model's class is swapped too, so that each forward starts with fresh token
positions (families with RoPE or a relative-position bias need them in every
block after the first EViT block, which become position followers).
Anything else timm holds gets a one-line refusal that says why.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import EViTConfig
from ..errors import EvitError
from .block import clear_block, setup_block
from .timm_blocks import EViTBlockMixin, EViTModelMixin, PositionState
from .timm_families import family_of

name = "timm"

_EXTRA_ATTRS = ("evit_state", "evit_index", "evit_prefix", "evit_sequence")
_CLASSES: dict[tuple[type, type], type] = {}

# timm ViT-like classes EViT cannot serve, and why (class name -> what is not supported)
_LATE_CLASS_ATTENTION = {"Cait", "Xcit", "VOLO"}
_NOT_YET = {
    "TNT": "pixel-level inner transformer",
    "PoolingVisionTransformer": "pooling stages between blocks",
    "VisionTransformerSAM": "windowed attention",
}
_FEATURE_WRAPPERS = {"FeatureGetterNet", "FeatureListNet", "FeatureDictNet", "FeatureHookNet"}
_POOLS = {"avg": "global average", "max": "global max", "avgmax": "global average and max",
          "map": "attention pool (MAP)", "": "no pooling at all"}


def _original(cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, (EViTBlockMixin, EViTModelMixin)) else cls


def _evit_class(cls: type, mixin: type, attrs: dict) -> type:
    if (cls, mixin) not in _CLASSES:
        _CLASSES[(cls, mixin)] = type(f"EViT{cls.__name__}", (mixin, cls), {"__module__": __name__, **attrs})
    return _CLASSES[(cls, mixin)]


def matches(model: nn.Module) -> bool:
    """A spec'd family (subclasses included), or any other timm model (which ``check`` refuses, saying why)."""
    return family_of(model) is not None or _original(type(model)).__module__.startswith("timm.")


def depth(model: nn.Module) -> int:
    """Number of EViT layers a user can choose from (blocks; CrossViT: multi-scale stages)."""
    return len(family_of(model).layers(model))


def sequences(model: nn.Module):
    """Every token sequence of the model (one, or one per CrossViT branch), the reported one first."""
    return family_of(model).sequences(model)


def num_prefix_tokens(model: nn.Module) -> int:
    return sequences(model)[0].num_prefix


def img_size(model: nn.Module) -> int:
    return family_of(model).img_size(model)


def num_tokens(model: nn.Module) -> int:
    """Sequence length entering the first block (of the reported sequence)."""
    return sequences(model)[0].num_tokens


def data_config(model: nn.Module) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    size = img_size(model)
    cfg["input_size"] = (3, size, size)  # the model's own size, also when built at another one
    return cfg


def class_names(model: nn.Module) -> list[str] | None:
    return getattr(model, "evit_class_names", None)


# ------------------------------------------------------------------ refusals


def _label(model: nn.Module) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    cls = _original(type(model)).__name__
    return f"{arch} ({cls})" if arch else cls


def _no_class_token(model: nn.Module, label: str) -> str:
    pool = getattr(model, "global_pool", "avg")
    how = _POOLS.get(pool, f"{pool!r} pooling")
    return (f"{label} has no class token (it pools by {how}): EViT ranks tokens by class-token attention, "
            "so pick a model with a class token (e.g. deit_small_patch16_224)")


def _refusal(model: nn.Module) -> str | None:
    """Why EViT cannot convert ``model``, in one line (None: it can)."""
    cls, label = _original(type(model)).__name__, _label(model)
    if cls in _FEATURE_WRAPPERS:
        return (f"{cls} is a features_only wrapper: convert the ViT itself (timm.create_model without "
                "features_only) and call its forward_intermediates")
    if cls in _LATE_CLASS_ATTENTION:
        return (f"{label} attends with its class token only in its last class-attention blocks: EViT needs "
                "class-token attention in the blocks it reorganizes")
    fam = family_of(model)
    has_cls = any(n.rsplit(".", 1)[-1].startswith("cls_token") for n, _ in model.named_parameters())
    if fam is None:
        if cls in _NOT_YET:
            return _no_class_token(model, label) if not has_cls else \
                f"{label} is a ViT with a class token, but its {_NOT_YET[cls]} is not supported yet"
        return (f"{label} is not a supported Vision Transformer: EViT needs a ViT with a class token "
                "(timm VisionTransformer, Eva, Beit, VisionTransformerRelPos, NaFlexVit or CrossVit)")
    if not has_cls:
        return _no_class_token(model, label)
    why = fam.refusal(model) if fam.refusal is not None else None
    if why:
        return f"{label} is a ViT with a class token, but its {why} is not supported yet"
    for i, group in enumerate(fam.layers(model)):
        for blk in group:
            why = _block_refusal(fam, blk)
            if why:
                return f"{label} is a ViT with a class token, but its {why} (block {i + 1}) is not supported yet"
    return None


def _block_refusal(fam, blk: nn.Module) -> str | None:
    spec = fam.block_spec(_original(type(blk)))
    if spec is None:
        return f"{_original(type(blk)).__name__} block"
    if spec.attn_path is None:
        return None
    attns = [br.attn for br in getattr(blk, spec.attn_path)] if spec.attn_path == "attns" else [blk.attn]
    bad = [type(a).__name__ for a in attns if type(a) not in spec.attentions]
    return f"{bad[0]} attention in a {spec.block.__name__}" if bad else None


def check(model: nn.Module) -> None:
    why = _refusal(model)
    if why:
        raise EvitError(why)


# ------------------------------------------------------------------ apply / remove


def apply(model: nn.Module, cfg: EViTConfig) -> None:
    check(model)
    remove(model)
    fam = family_of(model)
    state = PositionState()
    prefixes = [seq.num_prefix for seq in sequences(model)]
    model.__class__ = _evit_class(type(model), EViTModelMixin, {"evit_family": fam})
    model.evit_state = state
    rates = dict(zip(cfg.indices, cfg.keep_rates))
    first = min(cfg.indices)
    for i, group in enumerate(fam.layers(model)):
        if i not in rates and (fam.position is None or i < first):
            continue
        for seq, blk in enumerate(group):  # one block per token sequence (CrossViT: per branch)
            spec = fam.block_spec(type(blk))
            blk.__class__ = _evit_class(type(blk), EViTBlockMixin, {"evit_spec": spec, "evit_family": fam})
            blk.evit_state, blk.evit_index, blk.evit_prefix, blk.evit_sequence = state, i, prefixes[seq], seq
            if i in rates:
                setup_block(blk, rates[i], prefixes[seq], cfg.fuse)


def remove(model: nn.Module) -> None:
    model.__class__ = _original(type(model))
    model.__dict__.pop("evit_state", None)
    for blk in model.modules():
        if isinstance(blk, EViTBlockMixin):
            blk.__class__ = _original(type(blk))
            clear_block(blk)
            for attr in _EXTRA_ATTRS:
                blk.__dict__.pop(attr, None)


# ------------------------------------------------------------------ heads, classes, size


def reset_head(model: nn.Module, num_classes: int, class_names: list[str]) -> None:
    model.reset_classifier(num_classes)
    set_class_names(model, class_names)
    src = getattr(model, "evit_source", None)
    if src is not None:
        src.setdefault("kwargs", {})["num_classes"] = num_classes


def logits(model: nn.Module, output) -> torch.Tensor:
    if isinstance(output, tuple):  # distilled training mode: class and distillation heads
        return (output[0] + output[1]) / 2
    return output


def num_classes(model: nn.Module) -> int:
    return int(model.num_classes)


def set_class_names(model: nn.Module, class_names: list[str]) -> None:
    model.evit_class_names = list(class_names)


def set_img_size(model: nn.Module, size: int) -> None:
    """Run at ``size`` px: position embeddings resampled (bicubic), as timm does (RoPE grids and
    relative-position tables too, for EVA and BEiT)."""
    import logging

    logging.getLogger("timm.layers.pos_embed").setLevel(logging.WARNING)
    if not hasattr(model, "set_input_size"):
        raise EvitError(f"{_label(model)} cannot be resized by timm (it has no set_input_size): keep its {img_size(model)} px")
    model.set_input_size(img_size=(size, size))
    src = getattr(model, "evit_source", None)
    if src is not None:
        src.setdefault("kwargs", {})["img_size"] = size
