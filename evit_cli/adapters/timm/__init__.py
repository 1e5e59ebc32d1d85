"""EViT for timm Vision Transformers: every family spec'd in ``timm_families``.

Like ToMe's patches, the chosen blocks get a subclass swapped in
(:mod:`.swap`), so parameters and state-dict keys stay those of timm; the
model's class is swapped too, so that each forward starts with fresh token
positions (families with RoPE or a relative-position bias need them in every
block after the first EViT block, which become position followers).
Anything else timm holds gets a one-line refusal that says why.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...algorithm.config import NO_CLASS_TOKEN_SCORE, SCORES, EViTConfig
from ...algorithm.state import model_state
from ...errors import EvitError
from ..base import Adapter, Sequence
from ..block import BlockState, PositionState, clear_block
from ..swap import original, swap_in, swap_out
from .blocks import EViTBlockMixin
from .families import ModelSpec, family_of
from .model import EViTModelMixin
from .pooling import pool_kind, pool_refusal, probe

# timm ViT-like classes EViT cannot serve, and why (class name -> what is not supported)
_LATE_CLASS_ATTENTION = {"Cait", "Xcit", "VOLO"}
_NOT_YET = {
    "TNT": "pixel-level inner transformer",
    "PoolingVisionTransformer": "pooling stages between blocks",
    "VisionTransformerSAM": "windowed attention",
}
_FEATURE_WRAPPERS = {"FeatureGetterNet", "FeatureListNet", "FeatureDictNet", "FeatureHookNet"}


# ------------------------------------------------------------------ refusals


def _label(model: nn.Module) -> str:
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    cls = original(type(model)).__name__
    return f"{arch} ({cls})" if arch else cls


def has_class_token(model: nn.Module) -> bool:
    return any(n.rsplit(".", 1)[-1].startswith("cls_token") for n, _ in model.named_parameters())


def _unspecd_refusal(model: nn.Module, has_cls: bool) -> str | None:
    """Why a timm model of no spec'd family (or a features wrapper, or a late class-attention model) cannot convert."""
    cls, label = original(type(model)).__name__, _label(model)
    if cls in _FEATURE_WRAPPERS:
        return (f"{cls} is a features_only wrapper: convert its model (evit_cli.convert(net.model, ...)); the "
                "wrapper then returns full maps, the removed patches put back")
    if cls in _LATE_CLASS_ATTENTION:
        return (f"{label} attends with its class token only in its last class-attention blocks: EViT needs "
                "class-token attention in the blocks it reorganizes")
    if family_of(model) is not None:
        return None
    if cls in _NOT_YET:
        return f"{label} is a ViT{' with a class token' * has_cls}, but its {_NOT_YET[cls]} is not supported yet"
    return (f"{label} is not a supported Vision Transformer: EViT serves timm VisionTransformer, Eva, Beit, "
            "VisionTransformerRelPos, NaFlexVit and CrossVit")


def refusal(model: nn.Module) -> str | None:
    """Why EViT cannot convert ``model``, in one line (None: it can)."""
    has_cls = has_class_token(model)
    why = _unspecd_refusal(model, has_cls)
    if why:
        return why
    fam, label = family_of(model), _label(model)
    why = pool_refusal(model) if not has_cls else None
    if why:
        return f"{label} has no class token and {why}"
    what = f"{label} is a ViT{' with a class token' * has_cls}"
    why = fam.refusal(model) if fam.refusal is not None else None
    if why:
        return f"{what}, but its {why} is not supported yet"
    for i, group in enumerate(fam.layers(model)):
        for blk in group:
            why = _block_refusal(fam, blk)
            if why:
                return f"{what}, but its {why} (block {i + 1}) is not supported yet"
    return None


def _block_refusal(fam: ModelSpec, blk: nn.Module) -> str | None:
    spec = fam.block_spec(original(type(blk)))
    if spec is None:
        return f"{original(type(blk)).__name__} block"
    if spec.attn_path is None:
        return None
    attns = [br.attn for br in getattr(blk, spec.attn_path)] if spec.attn_path == "attns" else [blk.attn]
    bad = [type(a).__name__ for a in attns if type(a) not in spec.attentions]
    return f"{bad[0]} attention in a {spec.block.__name__}" if bad else None


def _family(model: nn.Module) -> ModelSpec:
    """The model's spec; for a model of no spec'd family, the refusal that says why."""
    fam = family_of(model)
    if fam is None:
        raise EvitError(refusal(model))
    return fam


# ------------------------------------------------------------------ the adapter


class TimmAdapter(Adapter):
    name = "timm"

    def matches(self, model: nn.Module) -> bool:
        """A spec'd family (subclasses included), or any other timm model (which ``check`` refuses, saying why)."""
        return family_of(model) is not None or original(type(model)).__module__.startswith("timm.")

    def check(self, model: nn.Module) -> None:
        why = refusal(model)
        if why:
            raise EvitError(why)

    def scores(self, model: nn.Module) -> tuple[str, ...]:
        """Class attention first where there is a class token, else the class-token-free default; ``"probe"``
        for an attention-pool (MAP) tower."""
        free = [NO_CLASS_TOKEN_SCORE] + [s for s in SCORES if s not in ("cls", "probe", NO_CLASS_TOKEN_SCORE)]
        ours = ["cls", *free] if has_class_token(model) else free
        return tuple(ours + ["probe"] * (pool_kind(model) == "map" and len(self.sequences(model)) == 1))

    def restores(self, model: nn.Module) -> bool:
        """Every timm ViT: ``forward_intermediates(output_fmt="NCHW")`` puts the removed patches back, with a
        classifier head too (model.py)."""
        return True

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The blocks (CrossViT: the multi-scale stages), of the reported sequence."""
        return [group[0] for group in _family(model).layers(model)]

    def sequences(self, model: nn.Module) -> list[Sequence]:
        """Every token sequence of the model (one, or one per CrossViT branch), the reported one first."""
        return _family(model).sequences(model)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return self.sequences(model)[0].num_prefix

    def num_tokens(self, model: nn.Module) -> int:
        return self.sequences(model)[0].num_tokens

    def img_size(self, model: nn.Module) -> int:
        return _family(model).img_size(model)

    def data_config(self, model: nn.Module) -> dict:
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        size = self.img_size(model)
        cfg["input_size"] = (3, size, size)  # the model's own size, also when built at another one
        return cfg

    def set_img_size(self, model: nn.Module, size: int) -> None:
        """Run at ``size`` px: position embeddings resampled (bicubic), as timm does (RoPE grids and
        relative-position tables too, for EVA and BEiT)."""
        logging.getLogger("timm.layers.pos_embed").setLevel(logging.WARNING)
        if not hasattr(model, "set_input_size"):
            raise EvitError(f"{_label(model)} cannot be resized by timm (it has no set_input_size): "
                            f"keep its {self.img_size(model)} px")
        model.set_input_size(img_size=(size, size))
        src = model_state(model).source
        if src is not None:
            src.setdefault("kwargs", {})["img_size"] = size

    # ------------------------------------------------------------ apply / remove

    def apply(self, model: nn.Module, cfg: EViTConfig) -> None:
        self.remove(model)
        fam = _family(model)
        positions = PositionState(track_sizes=cfg.proportional or cfg.method == "squeeze" or cfg.score != "cls",
                                  weighs_pool=cfg.score != "cls")
        prefixes = [seq.num_prefix for seq in fam.sequences(model)]
        if cfg.method != "evit" and len(prefixes) > 1:
            raise EvitError(f"the {cfg.method} method follows one token sequence: {_label(model)} has "
                            f"{len(prefixes)} (convert it with the evit method)")
        swap_in(model, EViTModelMixin)
        model_state(model).positions = positions
        rates = dict(zip(cfg.indices, cfg.keep_rates))
        first = min(cfg.indices)
        for i, group in enumerate(fam.layers(model)):
            if i not in rates and ((fam.position is None and not cfg.proportional) or i < first):
                continue
            for seq, blk in enumerate(group):  # one block per token sequence (CrossViT: per branch)
                spec = fam.block_spec(original(type(blk)))
                swap_in(blk, EViTBlockMixin)
                blk.evit = BlockState(index=i, num_prefix=prefixes[seq], family=fam, block_spec=spec, sequence=seq,
                                      positions=positions, keep_rate=rates.get(i), fuse=cfg.fuse,
                                      proportional=cfg.proportional, method=cfg.method, score=cfg.score,
                                      probe=probe(model, prefixes[seq]) if cfg.score == "probe" else None)

    def remove(self, model: nn.Module) -> None:
        swap_out(model)
        model_state(model).positions = None
        for blk in model.modules():
            if isinstance(blk, EViTBlockMixin):
                swap_out(blk)
                clear_block(blk)

    # ------------------------------------------------------------ heads, classes, output

    def num_classes(self, model: nn.Module) -> int:
        return int(model.num_classes)

    def class_names(self, model: nn.Module) -> list[str] | None:
        return model_state(model).class_names

    def set_class_names(self, model: nn.Module, class_names: list[str]) -> None:
        model_state(model).class_names = list(class_names)

    def head(self, model: nn.Module) -> nn.Module | None:
        """``get_classifier()`` (the class head of a distilled model); None with ``num_classes=0``."""
        head = model.get_classifier() if model.num_classes else None
        return head if isinstance(head, nn.Module) and not isinstance(head, nn.Identity) else None

    def reset_head(self, model: nn.Module, num_classes: int, class_names: list[str]) -> None:
        model.reset_classifier(num_classes)
        self.set_class_names(model, class_names)
        src = model_state(model).source
        if src is not None:
            src.setdefault("kwargs", {})["num_classes"] = num_classes

    def output(self, model: nn.Module, raw) -> torch.Tensor:
        """What timm's forward returns: the logits, or with ``num_classes=0`` the pre-logits features
        (``forward_head(forward_features(x), pre_logits=True)``); a distilled model in training mode
        returns its class and distillation heads, averaged here as timm does in eval mode."""
        if isinstance(raw, tuple):
            return (raw[0] + raw[1]) / 2
        return raw


TIMM = TimmAdapter()
