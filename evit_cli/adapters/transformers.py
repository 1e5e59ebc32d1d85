"""EViT for Hugging Face transformers ViT and DeiT models.

Covers ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``.
The chosen ``ViTLayer``/``DeiTLayer`` modules get an EViT subclass swapped in,
so weights, keys and ``save_pretrained`` stay those of transformers. Works with
the model's own attention implementation (eager or sdpa).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..config import EViTConfig
from ..errors import EvitError
from ..reorg import class_attention
from .block import clear_block, reorganize_tokens, runs_dense, setup_block

name = "transformers"

# layer class name -> number of prefix tokens the family's embeddings put first
_PREFIX = {"ViTLayer": 1, "DeiTLayer": 2}
_EVIT_CLASSES: dict[type, type] = {}


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _layers(model: nn.Module) -> nn.ModuleList:
    return _base(model).layers


def _attention_with_cls(attn: nn.Module, h: torch.Tensor, attention_mask, kwargs):
    """The layer's attention, through the model's attention interface, plus the class-token row (B, N)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, weights = interface(
        attn, q, k, v, attention_mask,
        dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling, **kwargs,
    )
    if weights is not None:  # eager already formed the matrix: its class row is the same numbers
        cls_attn = weights[:, :, 0].float().mean(dim=1)
    else:
        cls_attn = class_attention(q[:, :, :1], k, attn.scaling)
    out = attn.o_proj(out.reshape(*h.shape[:-1], -1).contiguous())
    return out, cls_attn


class EViTLayerMixin:
    """Forward of a ViT/DeiT layer with the reorganization between attention and MLP."""

    evit_keep_rate: float
    evit_num_prefix: int
    evit_fuse: bool
    evit_record: bool = False
    evit_kept: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if runs_dense(self, int(hidden_states.shape[1])):
            self.evit_kept = None
            return super().forward(hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise EvitError("EViT layers do not take an attention mask: call the model without one")
        a, cls_attn = _attention_with_cls(self.attention, self.layernorm_before(hidden_states), attention_mask, kwargs)
        x = self.dropout(a) + hidden_states
        x, _ = reorganize_tokens(self, x, cls_attn)
        return self.dropout(self.mlp(self.layernorm_after(x))) + x


def _evit_class(cls: type) -> type:
    if cls not in _EVIT_CLASSES:
        _EVIT_CLASSES[cls] = type(f"EViT{cls.__name__}", (EViTLayerMixin, cls), {})
    return _EVIT_CLASSES[cls]


def _original_class(cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, EViTLayerMixin) else cls


def matches(model: nn.Module) -> bool:
    layers = getattr(_base(model), "layers", None)
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and _original_class(type(layers[0])).__name__ in _PREFIX
        and hasattr(model, "config")
    )


def depth(model: nn.Module) -> int:
    return len(_layers(model))


def num_prefix_tokens(model: nn.Module) -> int:
    return _PREFIX[_original_class(type(_layers(model)[0])).__name__]


def img_size(model: nn.Module) -> int:
    size = model.config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def num_tokens(model: nn.Module) -> int:
    return int(_base(model).embeddings.patch_embeddings.num_patches) + num_prefix_tokens(model)


def data_config(model: nn.Module) -> dict:
    """timm-style preprocessing from the model's image processor settings (ViT's defaults otherwise)."""
    proc = getattr(model, "evit_preprocessor", None) or {}
    size = img_size(model)
    resample = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(proc.get("resample", 2), "bilinear")
    crop = proc.get("crop_size") if proc.get("do_center_crop") else None
    resize = proc.get("size", {}).get("shortest_edge") or proc.get("size", {}).get("height") or size
    return {
        "input_size": (3, size, size),
        "interpolation": resample,
        "mean": tuple(proc.get("image_mean", (0.5, 0.5, 0.5))),
        "std": tuple(proc.get("image_std", (0.5, 0.5, 0.5))),
        "crop_pct": (size / resize) if crop else 1.0,
        "crop_mode": "center",
    }


def class_names(model: nn.Module) -> list[str] | None:
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def check(model: nn.Module) -> None:
    attn = _layers(model)[0].attention
    for attr in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"):
        if not hasattr(attn, attr):
            raise EvitError(
                f"this transformers version lays out {type(attn).__name__} without {attr!r}: "
                "install transformers>=5 (pip install -U transformers)"
            )


def apply(model: nn.Module, cfg: EViTConfig) -> None:
    check(model)
    remove(model)
    prefix = num_prefix_tokens(model)
    layers = _layers(model)
    for idx, rate in zip(cfg.indices, cfg.keep_rates):
        layer = layers[idx]
        layer.__class__ = _evit_class(type(layer))
        setup_block(layer, rate, prefix, cfg.fuse)


def remove(model: nn.Module) -> None:
    for layer in _layers(model):
        if isinstance(layer, EViTLayerMixin):
            layer.__class__ = _original_class(type(layer))
            clear_block(layer)


def reset_head(model: nn.Module, num_classes: int, class_names: list[str]) -> None:
    heads = [n for n in ("classifier", "cls_classifier", "distillation_classifier") if hasattr(model, n)]
    if not heads:
        raise EvitError(f"{type(model).__name__} has no classification head: use a *ForImageClassification model")
    for n in heads:
        setattr(model, n, nn.Linear(model.config.hidden_size, num_classes))
    model.config.num_labels = num_classes
    set_class_names(model, class_names)


def logits(model: nn.Module, output) -> torch.Tensor:
    if not hasattr(output, "logits"):
        raise EvitError(f"{type(model).__name__} has no classification head: use a *ForImageClassification model")
    return output.logits


def num_classes(model: nn.Module) -> int:
    return int(model.config.num_labels) if hasattr(model, "classifier") or hasattr(model, "cls_classifier") else 0


def set_class_names(model: nn.Module, class_names: list[str]) -> None:
    model.config.id2label = dict(enumerate(class_names))
    model.config.label2id = {c: i for i, c in enumerate(class_names)}


def set_img_size(model: nn.Module, size: int) -> None:
    """Run at ``size`` px: position embeddings resampled (bicubic) and the config updated."""
    import torch.nn.functional as F

    emb = _base(model).embeddings
    pe = emb.position_embeddings
    prefix = num_prefix_tokens(model)
    patch = emb.patch_embeddings.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    old, new = int(round((pe.shape[1] - prefix) ** 0.5)), size // patch
    grid = pe[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False).to(pe.dtype)
    emb.position_embeddings = nn.Parameter(torch.cat([pe[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], 1))
    emb.patch_embeddings.image_size = (size, size)
    if hasattr(emb, "image_size"):
        emb.image_size = (size, size)
    emb.patch_embeddings.num_patches = new * new
    model.config.image_size = size
