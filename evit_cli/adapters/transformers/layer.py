"""The EViT layer for every transformers family, driven by its :class:`~.families.Family` spec.

Every layer of a converted model gets an EViT subclass swapped in (weights and
keys stay those of transformers). Layers without a keep rate run the original
forward; the EViT ones (and, for relative-position families, every layer, so
that the bias follows the kept tokens) run :meth:`EViTLayerMixin.forward`:
attention through the model's own attention interface (eager or sdpa), the
attention residual, the shared EViT step, then the MLP on the shorter sequence.
The attention is always the EViT one: it rotates queries and keys with the
(cos, sin) the layer hands it (RoPE families), which every layer after an EViT
one gathers for the tokens that remain (:mod:`.positions`).

Masks: a converted model refuses a user ``attention_mask`` (a hook on the
encoder); the masks transformers builds itself are then all-visible (e.g.
during ``torch.export``) and are dropped, since after a reorganization they
would have the wrong length. SigLIP 2's patch mask is the exception
(:mod:`.padding`): it reaches the layers until a token moved, then a mask
that follows the tokens replaces it.
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from torch import Tensor, nn

from ...algorithm.reorg import class_attention, score_row, size_bias
from ...errors import EvitError
from ..block import BlockState, EViTBlock, clear_block, runs_dense
from ..swap import original
from ..swap import swap_in as swap_class
from ..swap import swap_out as restore_class
from .families import FAMILIES, Family, module_chain, resolve
from .padding import padding_bias
from .positions import reorganize as follow_kept_positions
from .positions import rope_for, rotate
from .relpos import bias_for


def family_of(layer: nn.Module) -> Family | None:
    return FAMILIES.get(original(type(layer)).__name__)


class EViTAttentionMixin:
    """The family's attention; with ``evit_cls`` given it also returns the class-token row (its
    layer's :class:`..block.BlockState`, shared in ``self.evit``, gives the family's spec).

    Called by the library's own layer (``evit_cls`` unset) it returns what the original
    returns: ``(out, weights)``, or ``out`` alone where the original does (YOLOS); called by
    the EViT layer, ``(out, weights, cls_attn)`` (``cls_attn`` ``None`` unless ``evit_cls``).
    It is called through the module, so transformers' ``output_attentions`` hooks record its
    weights as for the original attention.
    """

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, evit_cls: bool | None = None,
                **kwargs):
        spec: Family = self.evit.family
        head_dim = int(resolve(self, spec.head_dim))
        q, k, v = _project(self, spec, hidden_states, head_dim)
        if spec.rope:
            cos, sin = kwargs.pop("position_embeddings")
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scale = resolve(self, spec.scaling) if spec.scaling else head_dim ** -0.5
        dropout = float(resolve(self, spec.attn_dropout)) if self.training else 0.0
        out, weights = _attend(self, spec, q, k, v, attention_mask, dropout, scale, **kwargs)
        out = module_chain(self, spec.out_proj)(out.reshape(*hidden_states.shape[:-1], -1).contiguous())
        if evit_cls is None:
            return out if spec.attention_returns_output_only else (out, weights)
        if not evit_cls:
            return out, weights, None
        # from q and k, as sdpa: eager's weights are taken after attention dropout
        if self.evit.score != "cls":  # a class-token-free score; "probe": the pooling head ranks, after the residual
            return out, weights, None if self.evit.score == "probe" else score_row(
                self.evit.score, q, k, scale, attention_mask, v if self.evit.value_norm else None,
                self.evit.size_weights(hidden_states) if self.evit.score == "mean_query" else None,
                self.evit.valid_tokens(hidden_states) if self.evit.score == "received" else None)
        rows = self.evit.num_prefix if spec.pooled_class_tokens else 1
        bias = attention_mask[:, :, :rows] if attention_mask is not None else None
        cls_attn = class_attention(q[:, :, :rows], k, scale, bias, v=v if self.evit.value_norm else None)
        return out, weights, cls_attn.mean(1) if rows > 1 else cls_attn


def _project(attn: nn.Module, spec: Family, x: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values (B, H, N, D): three projections, or one fused one split in three (BLIP)."""
    if spec.qkv:
        qkv = resolve(attn, spec.qkv)(x).unflatten(-1, (3, -1, head_dim)).unbind(-3)
        return tuple(t.transpose(1, 2) for t in qkv)
    shape = (*x.shape[:-1], -1, head_dim)
    return tuple(resolve(attn, p)(x).view(shape).transpose(1, 2) for p in (spec.q, spec.k, spec.v))


def _attend(attn: nn.Module, spec: Family, q: Tensor, k: Tensor, v: Tensor, mask, dropout: float, scale: float,
            **kwargs):
    """(B, N, H, D) output and the weights (eager only), through the model's own attention implementation."""
    impl = resolve(attn, spec.config)._attn_implementation
    if spec.legacy or spec.explicit_attention:
        return _legacy_attention(q, k, v, mask, dropout, scale, eager=spec.explicit_attention or impl == "eager")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[original(type(attn)).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    kwargs["is_causal"] = False  # vision encoders: sdpa would read a missing module flag as causal
    return interface(attn, q, k, v, mask, dropout=dropout, scaling=scale, **kwargs)


def _legacy_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout: float, scale: float, eager: bool):
    """What the older layouts compute: the explicit softmax (eager, weights returned) or SDPA (no weights)."""
    if not eager:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
        return out.transpose(1, 2), None
    logits = (q @ k.transpose(-2, -1)) * scale
    weights = (logits + bias if bias is not None else logits).softmax(dim=-1)
    out = F.dropout(weights, dropout) @ v
    return out.transpose(1, 2), weights


def _branch(layer: nn.Module, spec: Family, y: Tensor, which: int) -> Tensor:
    """What the family does to a branch's output before the residual: dropout, layer scale, drop path."""
    if spec.dropout:
        y = getattr(layer, spec.dropout)(y)
    if spec.layer_scale:
        scale = getattr(layer, spec.layer_scale[which])
        if scale is not None:
            y = scale(y) if isinstance(scale, nn.Module) else scale * y
    if spec.drop_path:
        y = getattr(layer, spec.drop_path)(y)
    return y


class EViTLayerMixin(EViTBlock):
    """A family's layer with the reorganization between attention and MLP (its state in ``self.evit``)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        st: BlockState = self.evit
        spec: Family = st.family
        if st.index == 0 and st.positions is not None:  # a new forward: no token removed yet
            st.positions.reset()
        kwargs.update(zip(spec.layer_args, args))
        given = kwargs.pop("attention_mask", None)  # transformers' own all-visible mask (a user's is refused)
        want_weights = False
        if spec.legacy:  # the older call; the shared table's full bias is recomputed below for the tokens that remain
            want_weights = bool(kwargs.pop("output_attentions", False))
            kwargs.pop("relative_position_bias", None)
        if spec.rope:  # the rotations of the tokens that remain
            kwargs["position_embeddings"] = rope_for(self, kwargs["position_embeddings"])
        bias = bias_for(self, kwargs) if spec.relative_position_bias else None
        if spec.padded:  # SigLIP 2: transformers' patch mask until a token moved, then the one that follows them
            bias = padding_bias(st, hidden_states)
            given = given if st.positions.sizes is None else bias
        weighed = st.proportional and st.positions.sizes is not None
        if weighed:  # proportional attention: each key's logit raised by the log of the patches it holds
            sizes = size_bias(st.positions.sizes, st.num_prefix).to(hidden_states.dtype)
            bias = sizes if bias is None else bias + sizes
        # int(...) sizes are constants when traced; a rank hook makes it run at keep 1.0 too
        reduce = st.reorganizes and not runs_dense(st, int(hidden_states.shape[1]))
        if st.reorganizes:
            st.kept = None
        if not reduce and not spec.relative_position_bias and not spec.legacy and not weighed:
            mask = {"attention_mask": given if spec.padded else None} if "attention_mask" in spec.layer_args else {}
            return super().forward(hidden_states, **mask, **kwargs)
        x = hidden_states
        h = getattr(self, spec.norm1)(x)
        a, weights, cls_attn = getattr(self, spec.attention)(h, bias, evit_cls=reduce, **kwargs)
        x = x + _branch(self, spec, a, 0)
        if reduce:  # the positions follow the kept tokens there (position-term families)
            x = follow_kept_positions(self, x, cls_attn)
        x = x + _branch(self, spec, module_chain(self, spec.mlp)(getattr(self, spec.norm2)(x)), 1)
        if spec.legacy:  # the older layouts return a tuple, with the weights when asked
            return (x, weights) if want_weights else (x,)
        return x


def refuse_attention_mask(module: nn.Module, args, kwargs):
    """Forward pre-hook of a converted encoder: a user's attention mask cannot follow the kept tokens."""
    if kwargs.get("attention_mask") is not None:
        raise EvitError("an EViT model takes no attention_mask (its tokens change between layers): call it without one")
    return None


def swap_in(layer: nn.Module, state: BlockState) -> None:
    """Make ``layer`` (and its attention, which shares the state) an EViT layer."""
    swap_class(layer, EViTLayerMixin)
    attn = getattr(layer, state.family.attention)
    swap_class(attn, EViTAttentionMixin)
    layer.evit = attn.evit = state


def swap_out(layer: nn.Module) -> None:
    attn = getattr(layer, layer.evit.family.attention)
    for module in (attn, layer):
        restore_class(module)
        clear_block(module)


def is_evit_layer(layer: nn.Module) -> bool:
    return isinstance(layer, EViTLayerMixin)
