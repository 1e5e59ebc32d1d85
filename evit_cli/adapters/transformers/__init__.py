"""EViT for Hugging Face transformers ViTs: every family of :mod:`.families`.

The vision encoder's layers get EViT subclasses swapped in (see :mod:`.layer`),
so weights, keys and ``save_pretrained`` stay those of transformers; only the
vision tower of a CLIP model is touched (``TimmWrapper*`` models: see
:mod:`..timm_wrapper`). Works with the model's attention implementation
(eager or sdpa). Any other transformers model is refused with its reason.

Outputs of a converted model: ``last_hidden_state`` is ``(B, N_last, C)``,
the tokens after the last EViT layer (``[prefix, kept, fused]``); heads that
pool the class token are unchanged, heads that average the patch tokens
(BEiT, DINOv2's classifier) average the kept and fused tokens.
``output_hidden_states=True`` gives ``depth + 1`` states, state ``i`` of shape
``(B, N_i, C)`` with ``N_i`` the tokens after layer ``i`` (``i = 0``: the
embeddings); ``output_attentions=True`` gives one ``(B, H, N, N)`` map per
layer over the tokens entering it (with the eager attention; with sdpa
transformers returns none, as it does without EViT). A dense-prediction model (a backbone,
Depth Anything, BEiT segmentation: :mod:`.dense`) gets the hidden states its head reads on the
full patch grid, the removed patches put back, so its outputs keep the dense model's shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...algorithm.config import NO_CLASS_TOKEN_SCORE, SCORES, EViTConfig
from ...algorithm.reorg import weighted_mean
from ...algorithm.state import model_state
from ...errors import EvitError
from ..base import Adapter
from ..block import BlockState, PositionState
from .dense import install as restore_dense
from .dense import is_dense
from .dense import uninstall as unrestore_dense
from .families import Family, refusal, refused_class, resolve
from .layer import family_of, is_evit_layer, refuse_attention_mask
from .layer import swap_in as swap_layer_in
from .layer import swap_out as swap_layer_out
from .padding import install as follow_padding
from .padding import patchify
from .padding import uninstall as unfollow_padding
from .pooling import has_probe, probe
from .pooling import install as weigh_pooling
from .pooling import uninstall as unweigh_pooling
from .positions import FollowMidPositions
from .preprocess import data_config as processor_data_config
from .preprocess import input_size as processor_input_size
from .relpos import tables as bias_tables

# --------------------------------------------------------------------------- where things live


def vision_root(model: nn.Module) -> nn.Module:
    """The vision encoder: CLIP's vision tower, else the base model (of a dense head's backbone: Depth
    Anything's, UperNet's)."""
    root = getattr(model, "vision_model", None)
    if isinstance(root, nn.Module):
        return root
    backbone = getattr(model, "backbone", None)
    model = backbone if isinstance(backbone, nn.Module) else model
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
    return family_of(layers[0]) if layers is not None else None


def _family(model: nn.Module) -> Family:
    """The model's family; for a model of none, the refusal that says why."""
    spec = family(model)
    if spec is None:
        raise EvitError(refusal(model))
    return spec


def _config(model: nn.Module):
    return vision_root(model).config


def _patch(model: nn.Module) -> int:
    patch = _config(model).patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


_HEADS = ("classifier", "cls_classifier", "distillation_classifier")


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


# --------------------------------------------------------------------------- the adapter


class TransformersAdapter(Adapter):
    name = "transformers"

    def matches(self, model: nn.Module) -> bool:
        """Every transformers model: the supported ones convert, the others get :meth:`check`'s reason."""
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel)

    def check(self, model: nn.Module) -> None:
        if (refused_class(type(model).__name__) and not is_dense(model)) or family(model) is None:
            raise EvitError(refusal(model))
        spec = family(model)
        attn = getattr(_layers(model)[0], spec.attention)
        for path in ((spec.qkv,) if spec.qkv else (spec.q, spec.k, spec.v)) + (spec.head_dim, spec.attn_dropout):
            if resolve(attn, path) is None:
                raise EvitError(
                    f"this transformers version lays out {type(attn).__name__} without {path!r}: "
                    "install transformers>=5 (pip install -U transformers)"
                )

    def scores(self, model: nn.Module) -> tuple[str, ...]:
        """Class attention first where the family has class tokens, else the class-token-free default; ``"probe"``
        for a tower with an attention-pooling probe (SigLIP)."""
        spec = _family(model)
        free = [NO_CLASS_TOKEN_SCORE] + [s for s in SCORES if s not in ("cls", "probe", NO_CLASS_TOKEN_SCORE)]
        ours = ["cls", *free] if spec.prefix > 0 or spec.pooled_class_tokens else free
        return tuple(ours + ["probe"] * has_probe(vision_root(model)))

    def restores(self, model: nn.Module) -> bool:
        """A dense-prediction model (dense.py) puts the removed patches back; a classifier or tower never does."""
        return is_dense(model)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        _family(model)
        return list(_layers(model))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        spec = _family(model)
        extra = [int(getattr(_config(model), name, 0) or 0)
                 for name in (spec.prefix_config, spec.suffix_config) if name]
        return spec.prefix + sum(extra)  # the suffix tokens (YOLOS's detection tokens) are kept as the prefix ones

    def img_size(self, model: nn.Module) -> int:
        """The image side the model is run at: its config's, or for DINOv2 (any size) its processor's crop."""
        spec = family(model)
        proc = model_state(model).preprocessor
        if spec is not None and spec.any_input_size and proc:
            return int(processor_input_size(proc, spec.processor))
        if spec is not None and spec.padded:  # SigLIP 2: the square image whose patches fill its sequence
            return math.isqrt(int(_config(model).num_patches)) * _patch(model)
        size = _config(model).image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def num_tokens(self, model: nn.Module) -> int:
        return (self.img_size(model) // _patch(model)) ** 2 + self.num_prefix_tokens(model)

    def data_config(self, model: nn.Module) -> dict:
        """timm-style preprocessing equal to the model's transformers image processor (its defaults without a file)."""
        proc = model_state(model).preprocessor
        return processor_data_config(proc, _family(model).processor, self.img_size(model))

    def apply(self, model: nn.Module, cfg: EViTConfig) -> None:
        self.remove(model)
        spec, layers, root = _family(model), _layers(model), vision_root(model)
        sizes = cfg.proportional or cfg.method == "squeeze"
        free = cfg.score != "cls"  # a class-token-free score: the fused token stands for its patches, pools weigh it
        if (sizes or free) and spec.suffix_config:
            raise EvitError(f"{type(model).__name__} keeps tokens after its patches, which the sizes of the "
                            f"{cfg.method} method, proportional attention and the {cfg.score} score do not follow: "
                            "use the evit method and the cls score")
        if sizes and spec.padded:
            raise EvitError(f"{type(model).__name__} pads its patch sequences under a mask, which the {cfg.method} "
                            "method and proportional attention do not follow yet: use the evit method without "
                            "proportional attention")
        prefix, rates = self.num_prefix_tokens(model), dict(zip(cfg.indices, cfg.keep_rates))
        mid = resolve(root, spec.mid_positions) if spec.mid_positions else None
        follow = spec.relative_position_bias or spec.rope or mid is not None
        positions = PositionState(track_sizes=sizes or free) if follow or sizes or free or is_dense(model) else None
        states = [BlockState(index=i, num_prefix=prefix, family=spec, positions=positions, keep_rate=rates.get(i),
                             fuse=cfg.fuse, proportional=cfg.proportional, method=cfg.method, patch_size=_patch(model),
                             score=cfg.score, probe=probe(root) if cfg.score == "probe" else None,
                             bias_tables=bias_tables(layer, spec, root) if spec.relative_position_bias else ())
                  for i, layer in enumerate(layers)]
        for layer, state in zip(layers, states):
            swap_layer_in(layer, state)
        if mid is not None:
            mid.register_forward_hook(FollowMidPositions(states[0]))
        if spec.padded:  # which tokens are padding, per forward (padding.py)
            follow_padding(root, positions)
        if free:  # its pool weighs each token by the patches it holds (pooling.py)
            weigh_pooling(model, root, positions)
        if is_dense(model):  # its head reads every patch: the removed ones are put back (dense.py)
            restore_dense(model, root, positions, prefix)
            model_state(model).positions = positions  # where its restore strategy is set (restore_with)
        if any(c.__name__ == "ViTMAEModel" for c in type(root).__mro__):  # also a subclass (remote code)
            _masking_off(root)
        if refuse_attention_mask not in root._forward_pre_hooks.values():
            root.register_forward_pre_hook(refuse_attention_mask, with_kwargs=True)

    def remove(self, model: nn.Module) -> None:
        root, layers = vision_root(model), _layers(model)
        for layer in layers if layers is not None else ():
            if is_evit_layer(layer):
                swap_layer_out(layer)
        unrestore_dense(root)
        unweigh_pooling(model, root)
        unfollow_padding(root)
        hooks = root._forward_pre_hooks
        for key in [k for k, fn in hooks.items() if fn is refuse_attention_mask]:
            hooks.pop(key)
            root._forward_pre_hooks_with_kwargs.pop(key, None)
        spec = family(model)
        mid = resolve(root, spec.mid_positions) if spec is not None and spec.mid_positions else None
        if mid is not None:
            for key in [k for k, fn in mid._forward_hooks.items() if isinstance(fn, FollowMidPositions)]:
                mid._forward_hooks.pop(key)

    # ------------------------------------------------------------ heads, names, sizes

    def num_classes(self, model: nn.Module) -> int:
        has_head = any(isinstance(getattr(model, n, None), nn.Linear) for n in _HEADS)
        return int(model.config.num_labels) if has_head else 0

    def class_names(self, model: nn.Module) -> list[str] | None:
        id2label = getattr(model.config, "id2label", None) or {}
        names = [id2label[i] for i in sorted(id2label)]
        if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
            return None
        return names

    def set_class_names(self, model: nn.Module, class_names: list[str]) -> None:
        model.config.id2label = dict(enumerate(class_names))
        model.config.label2id = {c: i for i, c in enumerate(class_names)}

    def head(self, model: nn.Module) -> nn.Module | None:
        """The first linear head (``classifier``, or a distilled model's ``cls_classifier``)."""
        return next((getattr(model, n) for n in _HEADS if isinstance(getattr(model, n, None), nn.Linear)), None)

    def reset_head(self, model: nn.Module, num_classes: int, class_names: list[str]) -> None:
        heads = [n for n in _HEADS if isinstance(getattr(model, n, None), nn.Linear)]
        if not heads:
            raise EvitError(f"{type(model).__name__} has no classification head: use a *ForImageClassification model")
        for n in heads:
            old = getattr(model, n)
            setattr(model, n, nn.Linear(old.in_features, num_classes))
        model.config.num_labels = num_classes
        self.set_class_names(model, class_names)

    def set_img_size(self, model: nn.Module, size: int) -> None:
        """Run at ``size`` px: position embeddings resampled (bicubic) and the config updated (ViT-like families)."""
        emb = getattr(vision_root(model), "embeddings", None)
        pe = getattr(emb, "position_embeddings", None)
        if not isinstance(pe, nn.Parameter) or _family(model).any_input_size:
            raise EvitError(f"--img-size is not supported for {type(model).__name__} yet: convert it at its own size")
        prefix = 2 if family(model).prefix == 2 else 1  # register tokens carry no position embedding
        old, new = int(round((pe.shape[1] - prefix) ** 0.5)), size // _patch(model)
        grid = pe[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False).to(pe.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
        emb.position_embeddings = nn.Parameter(torch.cat([pe[:, :prefix], grid], 1))
        emb.patch_embeddings.image_size = (size, size)
        if hasattr(emb, "image_size"):
            emb.image_size = (size, size)
        emb.patch_embeddings.num_patches = new * new
        model.config.image_size = size

    # ------------------------------------------------------------ the model's output

    def run(self, model: nn.Module, images: torch.Tensor):
        """The model on images: a full CLIP model through its image tower (``get_image_features``); SigLIP 2 on the
        patches of ``images``, every one valid (``padding.patchify``)."""
        spec = family(model)
        if spec is not None and spec.padded:
            inputs = patchify(images, _patch(model))
            return model.get_image_features(**inputs) if hasattr(model, "text_model") else model(**inputs)
        if hasattr(model, "get_image_features") and (hasattr(model, "text_model") or hasattr(model, "language_model")):
            return model.get_image_features(pixel_values=images)
        return model(images)

    def output(self, model: nn.Module, raw) -> torch.Tensor:
        """The logits of a classifier; the embedding a headless model's users take: CLIP's projected
        image embedding (``image_embeds``, or ``pooler_output`` of a full CLIP model's
        ``get_image_features``), else the pooled output (DINOv2's and CLIP's normed class token,
        ViT's pooler, BEiT's mean pooling), a depth model's depth, a backbone's last feature map, else
        the class token of ``last_hidden_state``."""
        if isinstance(raw, torch.Tensor):
            return raw
        for attr in ("logits", "image_embeds", "pooler_output", "predicted_depth"):
            value = getattr(raw, attr, None)
            if value is not None:
                return value
        if getattr(raw, "feature_maps", None) is not None:  # a backbone: its last feature map
            return raw.feature_maps[-1]
        return self._first_or_mean(model, raw.last_hidden_state)

    def _first_or_mean(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The class token; a tower without one: the mean of its tokens, each weighted by the patches it holds."""
        spec = family(model)
        if spec is None or spec.prefix > 0 or spec.pooled_class_tokens:
            return hidden[:, 0]
        st = getattr(_layers(model)[0], "evit", None)
        sizes = st.positions.prefix_and_sizes(0, hidden) if st is not None and st.positions is not None else None
        return hidden.mean(dim=1) if sizes is None else weighted_mean(hidden, sizes)


TRANSFORMERS = TransformersAdapter()
