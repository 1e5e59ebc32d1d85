"""The EViT layer for every transformers family, driven by its :class:`~.families.Family` spec.

Every layer of a converted model gets an EViT subclass swapped in (weights and
keys stay those of transformers). Layers without a keep rate run the original
forward; the EViT ones (and, for relative-position families, every layer, so
that the bias follows the kept tokens) run :meth:`EViTLayerMixin.forward`:
attention through the model's own attention interface (eager or sdpa), the
attention residual, the shared EViT step, then the MLP on the shorter sequence.

Masks: a converted model refuses a user ``attention_mask`` (a hook on the
encoder); the masks transformers builds itself are then all-visible (e.g.
during ``torch.export``) and are dropped, since after a reorganization they
would have the wrong length.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from ...errors import EvitError
from ...reorg import class_attention
from ..block import reorganize_tokens, runs_dense
from . import relpos
from .families import FAMILIES, Family

_CLASSES: dict[tuple[type, type], type] = {}


def evit_class(cls: type, mixin: type) -> type:
    if (cls, mixin) not in _CLASSES:
        _CLASSES[(cls, mixin)] = type(f"EViT{cls.__name__}", (mixin, cls), {})
    return _CLASSES[(cls, mixin)]


def original_class(cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, (EViTLayerMixin, EViTAttentionMixin)) else cls


def family_of(layer: nn.Module) -> Family | None:
    return FAMILIES.get(original_class(type(layer)).__name__)


def _cls_row(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """Class-token attention row (B, N), mean over heads, bias included; O(N d), no N x N matrix."""
    if bias is None:
        return class_attention(q[:, :, :1], k, scale)
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1) + bias[:, :, :1]
    return logits.float().softmax(dim=-1).mean(dim=1).squeeze(1)


class EViTAttentionMixin:
    """The family's attention; with ``evit_cls=True`` it also returns the class-token row.

    ``(out, weights)`` as the original, or ``(out, weights, cls_attn)``. It is
    called through the module, so transformers' ``output_attentions`` hooks
    record its weights as for the original attention.
    """

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, evit_cls: bool = False, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        spec: Family = self.evit_family
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        scale = getattr(self, spec.scaling)
        eager = sys.modules[type(self).__mro__[2].__module__].eager_attention_forward
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        dropout = getattr(self, spec.attn_dropout) if self.training else 0.0
        out, weights = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=scale, **kwargs)
        out = getattr(self, spec.out_proj)(out.reshape(*hidden_states.shape[:-1], -1).contiguous())
        if not evit_cls:
            return out, weights
        if weights is not None:  # eager formed the matrix: its class row is the same numbers
            return out, weights, weights[:, :, 0].float().mean(dim=1)
        return out, weights, _cls_row(q, k, scale, attention_mask)


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


class EViTLayerMixin:
    """A family's layer with the reorganization between attention and MLP."""

    evit_record: bool = False
    evit_kept: Tensor | None = None

    def forward(self, hidden_states: Tensor, attention_mask=None, *args, **kwargs) -> Tensor:
        spec: Family = family_of(self)
        bias = relpos.bias_for(self, hidden_states, kwargs) if spec.relative_position_bias else None
        rate = self.__dict__.get("evit_keep_rate")
        # int(...) sizes are constants when traced; an evit_rank hook makes it run at keep 1.0 too
        reduce = rate is not None and not runs_dense(self, int(hidden_states.shape[1]))
        if rate is not None:
            self.evit_kept = None
        if not reduce and not spec.relative_position_bias:
            return super().forward(hidden_states, None, *args, **kwargs)
        x = hidden_states
        attn = getattr(self, spec.attention)
        h = getattr(self, spec.norm1)(x)
        a, _, cls_attn = attn(h, bias, evit_cls=True, **kwargs) if reduce else (*attn(h, bias, **kwargs), None)
        x = x + _branch(self, spec, a, 0)
        if reduce:
            x, kept = reorganize_tokens(self, x, cls_attn)
            if spec.relative_position_bias:
                relpos.follow(self, kept, self.evit_num_prefix, self.evit_fuse, x.shape[0], x.device)
        return x + _branch(self, spec, getattr(self, spec.mlp)(getattr(self, spec.norm2)(x)), 1)


def refuse_attention_mask(module: nn.Module, args, kwargs):
    """Forward pre-hook of a converted encoder: a user's attention mask cannot follow the kept tokens."""
    if kwargs.get("attention_mask") is not None:
        raise EvitError("an EViT model takes no attention_mask (its tokens change between layers): call it without one")
    return None


def swap_in(layer: nn.Module, spec: Family, num_prefix: int) -> None:
    layer.__class__ = evit_class(type(layer), EViTLayerMixin)
    layer.evit_num_prefix = int(num_prefix)
    attn = getattr(layer, spec.attention)
    attn.__class__ = evit_class(type(attn), EViTAttentionMixin)
    attn.evit_family = spec


def swap_out(layer: nn.Module, spec: Family) -> None:
    layer.__class__ = original_class(type(layer))
    layer.__dict__.pop("evit_num_prefix", None)
    attn = getattr(layer, spec.attention)
    attn.__class__ = original_class(type(attn))
    attn.__dict__.pop("evit_family", None)
    relpos.uninstall(layer)


def is_evit_layer(layer: nn.Module) -> bool:
    return isinstance(layer, EViTLayerMixin)

