"""Heads of transformers towers without a class token, kept faithful after EViT (SigLIP).

After a class-token-free score fused tokens, each remaining token stands for the patches it holds
(``PositionState.sizes``; the fused token is the score-weighted mean of what it fused). SigLIP's
attention-pooling head (``SiglipMultiheadAttentionPoolingHead``: one probe query over every token) then
adds ``log(size)`` to its logit for each token, and ``SiglipForImageClassification``'s average over the
tokens weighs each by its patches. While no token was removed (keep 1.0) the library's own forward runs,
unchanged. The ``"probe"`` score ranks a layer's tokens by the head's own probe query against the keys the
head would compute from them (``post_layernorm`` and the head's key projection applied to the layer's tokens).
SigLIP 2's head and classifier read its patch mask instead: once a token moved, the sizes (0 for padding) mask it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...algorithm.reorg import probe_attention, weighted_mean
from ..block import PositionState
from ..swap import original
from ..swap import swap_in as swap_class
from ..swap import swap_out as restore_class

PROBE_HEADS = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead")
MEAN_POOLED = {"SiglipForImageClassification": "vision_model", "IJepaForImageClassification": "ijepa"}
MASK_POOLED = "Siglip2ForImageClassification"  # the mean of the tokens its patch mask marks valid


def probe_head(root: nn.Module) -> nn.Module | None:
    """The vision tower's attention-pooling head, where it has one."""
    head = getattr(root, "head", None)
    return head if head is not None and original(type(head)).__name__ in PROBE_HEADS else None


class ProbeHeadMixin:
    """SigLIP's attention-pooling head (``nn.MultiheadAttention`` of one probe) with ``log(size)`` added to its
    logit for each token (SigLIP 2's: its patch mask, ``attention_mask``, read until a token moved; then a padded
    token's size 0 masks it)."""

    def forward(self, hidden_state: Tensor, *padding) -> Tensor:
        positions: PositionState = self.__dict__["evit"]
        sizes = positions.prefix_and_sizes(0, hidden_state)
        if sizes is None:
            return super().forward(hidden_state, *padding)
        b, heads = hidden_state.shape[0], self.attention.num_heads
        mask = sizes.log().to(hidden_state.dtype)[:, None, :].repeat_interleave(heads, dim=0)  # (B * H, 1, N)
        x = self.attention(self.probe.repeat(b, 1, 1), hidden_state, hidden_state, attn_mask=mask)[0]
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class MaskedMeanClassifierMixin:
    """SigLIP 2's classifier: the mean of the valid tokens (its patch mask), each weighted by the patches it holds
    once a token moved (padded tokens hold 0)."""

    def forward(self, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        positions: PositionState = self.__dict__["evit"]
        outputs = self.vision_model(pixel_values, pixel_attention_mask=pixel_attention_mask,
                                    spatial_shapes=spatial_shapes, **kwargs)
        seq = outputs.last_hidden_state
        sizes = positions.prefix_and_sizes(0, seq)
        if sizes is not None:
            pooled = weighted_mean(seq, sizes)
        elif pixel_attention_mask is not None:  # transformers' own pooling, unchanged
            pool_mask = pixel_attention_mask[..., None].to(seq.device)
            pooled = torch.sum(seq * pool_mask, dim=1) / torch.sum(pool_mask, dim=1)
        else:
            pooled = torch.mean(seq, dim=1)
        logits = self.classifier(pooled)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class ClsQueryHeadMixin:
    """AIMv2's attention-pooling head (a learned query over every token, through SDPA) with ``log(size)`` added
    to its logit for each token."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        positions: PositionState = self.__dict__["evit"]
        sizes = positions.prefix_and_sizes(0, hidden_states)
        if sizes is None:
            return super().forward(hidden_states)
        b, n, c = hidden_states.shape
        shape = (b, n, self.num_heads, c // self.num_heads)
        key = self.k_proj(hidden_states).reshape(shape).permute(0, 2, 1, 3)
        value = self.v_proj(hidden_states).reshape(shape).permute(0, 2, 1, 3)
        query = self.cls_token.expand(b, -1, -1).reshape(b, 1, self.num_heads, -1).permute(0, 2, 1, 3)
        bias = sizes.log().to(hidden_states.dtype)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self.output_proj(out.transpose(1, 2).reshape(b, 1, c).mean(dim=1))


class MeanPooledClassifierMixin:
    """A classifier that averages its tokens (``SiglipForImageClassification``, ``IJepaForImageClassification``),
    each weighted by the patches it holds."""

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding: bool = False, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        positions: PositionState = self.__dict__["evit"]
        tower = next(getattr(self, a) for c in type(self).__mro__ if (a := MEAN_POOLED.get(c.__name__)))
        outputs = tower(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        seq = outputs.last_hidden_state
        sizes = positions.prefix_and_sizes(0, seq)
        logits = self.classifier(seq.mean(dim=1) if sizes is None else weighted_mean(seq, sizes))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


def install(model: nn.Module, root: nn.Module, positions: PositionState) -> None:
    """Make the pooling of ``model`` (vision tower ``root``) weigh tokens by the patches they hold."""
    heads = {**dict.fromkeys(PROBE_HEADS, ProbeHeadMixin), "Aimv2AttentionPoolingHead": ClsQueryHeadMixin}
    head = getattr(root, "head", None)
    mixin = heads.get(original(type(head)).__name__) if isinstance(head, nn.Module) else None
    if mixin is not None:
        swap_class(head, mixin)
        head.__dict__["evit"] = positions
    names = {c.__name__ for c in type(model).__mro__}  # also a subclass (remote code)
    mixin = MaskedMeanClassifierMixin if MASK_POOLED in names else MeanPooledClassifierMixin if names & set(
        MEAN_POOLED) else None
    if mixin is not None:
        swap_class(model, mixin)
        model.__dict__["evit"] = positions


def uninstall(model: nn.Module, root: nn.Module) -> None:
    for module in (getattr(root, "head", None), model):
        if isinstance(module, (ProbeHeadMixin, ClsQueryHeadMixin, MeanPooledClassifierMixin,
                               MaskedMeanClassifierMixin)):
            restore_class(module)
            module.__dict__.pop("evit", None)


def probe(root: nn.Module):
    """The ``"probe"`` score of a tower with a probe head: ``(x (B, N, C), sizes (B, N) or None) -> (B, N)``."""
    head = probe_head(root)
    mha: nn.MultiheadAttention = head.attention

    def row(x: Tensor, sizes: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        heads = mha.num_heads
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        q = F.linear(head.probe, w[:c], bias[:c] if bias is not None else None)  # (1, 1, C)
        k = F.linear(root.post_layernorm(x), w[c:2 * c], bias[c:2 * c] if bias is not None else None)
        q = q.reshape(1, 1, heads, -1).transpose(1, 2).expand(b, -1, -1, -1)
        k = k.reshape(b, n, heads, -1).transpose(1, 2)
        log_sizes = sizes.log().to(x.dtype)[:, None, None, :] if sizes is not None else None
        return probe_attention(q, k, (c // heads) ** -0.5, log_sizes)

    return row


def has_probe(root: nn.Module) -> bool:
    return probe_head(root) is not None and isinstance(getattr(root, "post_layernorm", None), nn.Module)

