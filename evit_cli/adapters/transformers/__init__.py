"""EViT for Hugging Face transformers ViTs: every family of :mod:`.families`, and ``TimmWrapper*``.

The vision encoder's layers get EViT subclasses swapped in (see :mod:`.layer`),
so weights, keys and ``save_pretrained`` stay those of transformers; only the
vision tower of a CLIP model is touched. ``TimmWrapperModel`` /
``TimmWrapperForImageClassification`` are converted through the timm adapter
on their ``timm_model``. Works with the model's attention implementation
(eager or sdpa). Any other transformers model is refused with its reason.

Outputs of a converted model: ``last_hidden_state`` is ``(B, N_last, C)``,
the tokens after the last EViT layer (``[prefix, kept, fused]``); heads that
pool the class token are unchanged, heads that average the patch tokens
(BEiT, DINOv2's classifier) average the kept and fused tokens.
``output_hidden_states=True`` gives ``depth + 1`` states, state ``i`` of shape
``(B, N_i, C)`` with ``N_i`` the tokens after layer ``i`` (``i = 0``: the
embeddings); ``output_attentions=True`` gives one ``(B, H, N, N)`` map per
layer over the tokens entering it (with the eager attention; with sdpa
transformers returns none, as it does without EViT).
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import EViTConfig
from ...errors import EvitError
from ..block import clear_block, setup_block
from . import layer as hf_layer
from . import preprocess, relpos
from .families import Family, refusal, refused_class, resolve

name = "transformers"


# --------------------------------------------------------------------------- where things live


def _is_timm_wrapper(model: nn.Module) -> bool:
    return type(model).__name__ in ("TimmWrapperModel", "TimmWrapperForImageClassification")


def _timm(model: nn.Module):
    from .. import timm as timm_adapter

    return timm_adapter


def vision_root(model: nn.Module) -> nn.Module:
    """The vision encoder: CLIP's vision tower, else the base model."""
    root = getattr(model, "vision_model", None)
    if isinstance(root, nn.Module):
        return root
    return getattr(model, "base_model", model)


def _find_layers(root: nn.Module) -> nn.ModuleList | None:
    for holder in (root, getattr(root, "encoder", None)):
        for attr in ("layers", "layer"):
            layers = getattr(holder, attr, None) if holder is not None else None
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    return None


def _layers(model: nn.Module) -> nn.ModuleList:
    return _find_layers(vision_root(model))


def family(model: nn.Module) -> Family | None:
    layers = _find_layers(vision_root(model))
    return hf_layer.family_of(layers[0]) if layers is not None else None


def _config(model: nn.Module):
    return vision_root(model).config


# --------------------------------------------------------------------------- the adapter interface


def matches(model: nn.Module) -> bool:
    """Every transformers model: the supported ones convert, the others get :func:`check`'s reason."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def check(model: nn.Module) -> None:
    if _is_timm_wrapper(model):
        return _timm(model).check(model.timm_model)
    if refused_class(type(model).__name__) or family(model) is None:
        raise EvitError(refusal(model))
    spec = family(model)
    attn = getattr(_layers(model)[0], spec.attention)
    for path in (spec.q, spec.k, spec.v, spec.head_dim):
        if resolve(attn, path) is None:
            raise EvitError(
                f"this transformers version lays out {type(attn).__name__} without {path!r}: "
                "install transformers>=5 (pip install -U transformers)"
            )


def depth(model: nn.Module) -> int:
    if _is_timm_wrapper(model):
        return _timm(model).depth(model.timm_model)
    return len(_layers(model))


def num_prefix_tokens(model: nn.Module) -> int:
    if _is_timm_wrapper(model):
        return _timm(model).num_prefix_tokens(model.timm_model)
    spec = family(model)
    extra = int(getattr(_config(model), spec.prefix_config, 0) or 0) if spec.prefix_config else 0
    return spec.prefix + extra


def _patch(model: nn.Module) -> int:
    patch = _config(model).patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def img_size(model: nn.Module) -> int:
    """The image side the model is run at: its config's, or for DINOv2 (any size) its processor's crop."""
    if _is_timm_wrapper(model):
        return _timm(model).img_size(model.timm_model)
    spec = family(model)
    proc = getattr(model, "evit_preprocessor", None)
    if spec is not None and spec.any_input_size and proc:
        return int(preprocess.input_size(proc, spec.processor))
    size = _config(model).image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def num_tokens(model: nn.Module) -> int:
    if _is_timm_wrapper(model):
        return _timm(model).num_tokens(model.timm_model)
    return (img_size(model) // _patch(model)) ** 2 + num_prefix_tokens(model)


def data_config(model: nn.Module) -> dict:
    """timm-style preprocessing equal to the model's transformers image processor (its defaults without a file)."""
    if _is_timm_wrapper(model):
        return _timm(model).data_config(model.timm_model)
    return preprocess.data_config(getattr(model, "evit_preprocessor", None), family(model).processor, img_size(model))


def class_names(model: nn.Module) -> list[str] | None:
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def apply(model: nn.Module, cfg: EViTConfig) -> None:
    if _is_timm_wrapper(model):
        return _timm(model).apply(model.timm_model, cfg)
    check(model)
    remove(model)
    spec, layers, root = family(model), _layers(model), vision_root(model)
    prefix = num_prefix_tokens(model)
    for i, layer in enumerate(layers):
        hf_layer.swap_in(layer, spec, prefix)
    for idx, rate in zip(cfg.indices, cfg.keep_rates):
        setup_block(layers[idx], rate, prefix, cfg.fuse)
    if spec.relative_position_bias:
        relpos.install(layers, spec, root, _patch(model))
    if type(vision_root(model)).__name__ == "ViTMAEModel":
        _masking_off(root)
    if hf_layer.refuse_attention_mask not in root._forward_pre_hooks.values():
        root.register_forward_pre_hook(hf_layer.refuse_attention_mask, with_kwargs=True)


def remove(model: nn.Module) -> None:
    if _is_timm_wrapper(model):
        return _timm(model).remove(model.timm_model)
    spec, root = family(model), vision_root(model)
    for layer in _layers(model):
        if hf_layer.is_evit_layer(layer):
            hf_layer.swap_out(layer, spec)
            clear_block(layer)
    hooks = root._forward_pre_hooks
    for key in [k for k, fn in hooks.items() if fn is hf_layer.refuse_attention_mask]:
        hooks.pop(key)
        root._forward_pre_hooks_with_kwargs.pop(key, None)


class _Unshuffled:
    """ViT-MAE embeddings without random masking: every patch kept, in image order."""

    def random_masking(self, sequence: torch.Tensor, noise=None):
        b, n, _ = sequence.shape
        ids = torch.arange(n, device=sequence.device).expand(b, n)
        return sequence, torch.zeros(b, n, device=sequence.device, dtype=sequence.dtype), ids


def _masking_off(root: nn.Module) -> None:
    """EViT needs every patch: ViT-MAE's mask ratio goes to 0 and its token shuffle is removed (permanently)."""
    root.config.mask_ratio = 0.0
    emb = root.embeddings
    if not isinstance(emb, _Unshuffled):
        emb.__class__ = type(f"Unshuffled{type(emb).__name__}", (_Unshuffled, type(emb)), {})


# --------------------------------------------------------------------------- heads, names, sizes


_HEADS = ("classifier", "cls_classifier", "distillation_classifier")


def reset_head(model: nn.Module, num_classes: int, class_names: list[str]) -> None:
    if _is_timm_wrapper(model):
        raise EvitError("replacing the head of a TimmWrapper model is not supported: convert the timm model by name")
    heads = [n for n in _HEADS if isinstance(getattr(model, n, None), nn.Linear)]
    if not heads:
        raise EvitError(f"{type(model).__name__} has no classification head: use a *ForImageClassification model")
    for n in heads:
        old = getattr(model, n)
        setattr(model, n, nn.Linear(old.in_features, num_classes))
    model.config.num_labels = num_classes
    set_class_names(model, class_names)


def logits(model: nn.Module, output) -> torch.Tensor:
    if not hasattr(output, "logits"):
        raise EvitError(f"{type(model).__name__} has no classification head: use a *ForImageClassification model")
    return output.logits


def run(model: nn.Module, pixel_values: torch.Tensor):
    """The model on images: a full CLIP model through its image tower (``get_image_features``)."""
    if hasattr(model, "get_image_features") and hasattr(model, "text_model"):
        return model.get_image_features(pixel_values=pixel_values)
    return model(pixel_values)


def features(model: nn.Module, output) -> torch.Tensor:
    """The embedding a headless model gives: CLIP's projected image embedding, else the pooled or class token."""
    if isinstance(output, torch.Tensor):  # a headless TimmWrapper's timm model gives its pooled features
        return output
    for attr in ("image_embeds", "pooler_output"):
        value = getattr(output, attr, None)
        if value is not None:
            return value
    return output.last_hidden_state[:, 0]


def num_classes(model: nn.Module) -> int:
    if _is_timm_wrapper(model):
        return _timm(model).num_classes(model.timm_model)
    return int(model.config.num_labels) if any(isinstance(getattr(model, n, None), nn.Linear) for n in _HEADS) else 0


def set_class_names(model: nn.Module, class_names: list[str]) -> None:
    model.config.id2label = dict(enumerate(class_names))
    model.config.label2id = {c: i for i, c in enumerate(class_names)}


def set_img_size(model: nn.Module, size: int) -> None:
    """Run at ``size`` px: position embeddings resampled (bicubic) and the config updated (ViT-like families)."""
    import torch.nn.functional as F

    emb = getattr(vision_root(model), "embeddings", None)
    pe = getattr(emb, "position_embeddings", None)
    if _is_timm_wrapper(model) or not isinstance(pe, nn.Parameter) or family(model).any_input_size:
        raise EvitError(f"--img-size is not supported for {type(model).__name__} yet: convert it at its own size")
    prefix = 2 if family(model).prefix == 2 else 1  # register tokens carry no position embedding
    patch = _patch(model)
    old, new = int(round((pe.shape[1] - prefix) ** 0.5)), size // patch
    grid = pe[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False).to(pe.dtype)
    emb.position_embeddings = nn.Parameter(torch.cat([pe[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], 1))
    emb.patch_embeddings.image_size = (size, size)
    if hasattr(emb, "image_size"):
        emb.image_size = (size, size)
    emb.patch_embeddings.num_patches = new * new
    model.config.image_size = size
