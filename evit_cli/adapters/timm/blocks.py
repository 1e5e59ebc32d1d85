"""The generic EViT forward for timm blocks, driven by a family's spec (``timm_families``).

One attention function serves every family: it reads q/k/v with the
family's reader, applies q/k norms, RoPE or a relative-position bias, runs the
fused kernel for the output and computes the class-attention row on its own,
with the same rotated queries/keys and the same bias (so the row ranks by the
attention the block really computes). The layouts below (pre-norm, post-norm,
parallel branches, parallel scaling) place the shared EViT step
(:func:`.block.reorganize_tokens`) in the block.

Position terms follow the tokens: the model's blocks share one
:class:`.block.PositionState` (like ToMe's ``_tome_info``), reset at every model
entry point; a reorganizing block records there, per image, the original patch
index of every token it keeps (-1 for the fused token), and each later block
gathers its RoPE rows or bias rows/columns with it (``reorg.gather_rope``,
``reorg.gather_bias``). The fused token has no position: RoPE leaves it
unrotated, as timm leaves the class and register tokens, and a bias gives it
a zero row and column (it attends and is attended by content alone). Prefix
tokens keep their own terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import Tensor, nn

from ...algorithm.reorg import gather_bias, gather_rope, score_row, size_bias
from ...errors import EvitError
from ..block import BlockState, EViTBlock, reorganize_tokens, runs_dense


class Terms(NamedTuple):
    """What a block call brings besides ``x``: position terms and whether a mask was given."""

    rope: Tensor | None = None  # (N, D) or (..., N, D): sin and cos of the N patches
    bias: Tensor | None = None  # (b, H, P + N, P + N) additive attention bias
    masked: bool = False


# ----------------------------------------------------------------- q/k/v readers


def _heads(t: Tensor, B: int, N: int, heads: int) -> Tensor:
    return t.reshape(B, N, heads, -1).transpose(1, 2)


def fused_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One ``qkv`` Linear, its bias included (timm ``Attention``)."""
    B, N, _ = x.shape
    return attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def fused_qkv_biases(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A bias-free ``qkv`` Linear plus ``q_bias``/``k_bias``/``v_bias`` (BEiT, EVA); without
    those, the Linear's own bias (``AttentionRope``)."""
    if getattr(attn, "q_bias", None) is None:
        return fused_qkv(attn, x)
    B, N, _ = x.shape
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = attn.qkv(x) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(x, attn.qkv.weight, bias)
    return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def separate_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q_proj``/``k_proj``/``v_proj`` (grouped-query: fewer k/v heads)."""
    B, N, _ = x.shape
    kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
    return (_heads(attn.q_proj(x), B, N, attn.num_heads), _heads(attn.k_proj(x), B, N, kv_heads),
            _heads(attn.v_proj(x), B, N, kv_heads))


def eva_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """EVA attentions: fused (with separate biases) or separate projections, by configuration."""
    return separate_qkv(attn, x) if attn.qkv is None else fused_qkv_biases(attn, x)


# ----------------------------------------------------------------- attention


def _rotate(attn: nn.Module, t: Tensor, rope: Tensor, num_prefix: int) -> Tensor:
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :num_prefix], apply_rot_embed_cat(t[:, :, num_prefix:], rope, half=half)], dim=2)


def attention(attn: nn.Module, read_qkv, x: Tensor, terms: Terms, num_prefix: int,
              value_norm: bool = False, row: bool = True, score: str = "cls",
              weights: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The attention module's output and its ranking row (B, N) (``score``: the class-attention row, or a
    class-token-free one, ``reorg.score_row``; ``weights``: the patches each token holds), position terms
    applied (``value_norm``: each head's row weighted by its value norms, the ``squeeze`` method's ranking;
    ``row=False``: a block that only follows positions, no row, ``None``)."""
    B, N, _ = x.shape
    q, k, v = read_qkv(attn, x)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if terms.rope is not None:
        q, k = _rotate(attn, q, terms.rope, num_prefix).type_as(v), _rotate(attn, k, terms.rope, num_prefix).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bias = terms.bias.to(q.dtype) if terms.bias is not None else None
    cls_attn = score_row(score, q, k, attn.scale, bias, v if value_norm else None, weights) if row else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, N, -1)
    if getattr(attn, "norm", None) is not None:
        out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), cls_attn


def _scale(blk: nn.Module, name: str, y: Tensor) -> Tensor:
    """Layer scale: a module (``ls1``), a parameter (``gamma_1``) or none."""
    s = getattr(blk, name, None)
    if s is None:
        return y
    return s * y if isinstance(s, Tensor) else s(y)


def _ranking(blk: nn.Module, x: Tensor, active: bool) -> dict:
    """How the block's attention computes its ranking row: the keywords of :func:`attention`."""
    st: BlockState = blk.evit
    row = active and st.row_score is not None
    return {"value_norm": st.value_norm, "row": row, "score": st.row_score or "cls",
            "weights": st.size_weights(x) if row and st.score == "mean_query" else None}


def _maybe_reorganize(blk: nn.Module, x: Tensor, cls_attn: Tensor, active: bool):
    return reorganize_tokens(blk, x, cls_attn) if active else (x, None)


# ----------------------------------------------------------------- layouts
# Each takes (block, spec, x, terms, active) and returns (x, kept indices or None).


def pre_norm(blk, spec, x, terms, active):
    """``x + Attn(LN1 x)``, reorganize, ``x + FFN(LN2 x)`` (ViT ``Block``, ``EvaBlock``, BEiT ``Block``)."""
    a, cls_attn = attention(blk.attn, spec.reader(blk.attn), blk.norm1(x), terms, blk.evit.num_prefix,
                            **_ranking(blk, x, active))
    x = x + blk.drop_path1(_scale(blk, spec.layer_scale[0], a))
    x, kept = _maybe_reorganize(blk, x, cls_attn, active)
    return x + blk.drop_path2(_scale(blk, spec.layer_scale[1], blk.mlp(blk.norm2(x)))), kept


def post_norm(blk, spec, x, terms, active):
    """``x + LN1(Attn x)``, reorganize, ``x + LN2(FFN x)`` (``ResPostBlock``, ``EvaBlockPostNorm``)."""
    a, cls_attn = attention(blk.attn, spec.reader(blk.attn), x, terms, blk.evit.num_prefix,
                            **_ranking(blk, x, active))
    x = x + blk.drop_path1(blk.norm1(a))
    x, kept = _maybe_reorganize(blk, x, cls_attn, active)
    return x + blk.drop_path2(blk.norm2(blk.mlp(x))), kept


def parallel_branches(blk, spec, x, terms, active):
    """``ParallelThingsBlock``: the attention branches are summed, then the FFN branches;
    EViT sits between the two sums, ranking by the class row averaged over every head of every branch."""
    outs, rows = [], []
    for br in blk.attns:
        a, row = attention(br.attn, spec.reader(br.attn), br.norm(x), terms, blk.evit.num_prefix,
                           **_ranking(blk, x, active))
        outs.append(br.drop_path(br.ls(a)))
        rows.append(row)
    x = x + torch.stack(outs).sum(dim=0)
    ranked = active and blk.evit.row_score is not None
    x, kept = _maybe_reorganize(blk, x, torch.stack(rows).mean(dim=0) if ranked else None, active)
    return x + torch.stack([ffn(x) for ffn in blk.ffns]).sum(dim=0), kept


def parallel_scaling(blk, spec, x, terms, active):
    """``ParallelScalingBlock``: attention and MLP read the same ``in_norm(x)`` and share one
    residual, so there is no state between them: EViT reorganizes the block's output."""
    B, N, _ = x.shape
    x_mlp, q, k, v = torch.split(blk.in_proj(blk.in_norm(x)), blk.in_split, dim=-1)
    if blk.mlp_bias is not None:
        x_mlp = x_mlp + blk.mlp_bias
    q = blk.q_norm(q.view(B, N, blk.num_heads, blk.head_dim)).transpose(1, 2)
    k = blk.k_norm(k.view(B, N, blk.num_heads, blk.head_dim)).transpose(1, 2)
    v = v.view(B, N, blk.num_heads, blk.head_dim).transpose(1, 2)
    rank = _ranking(blk, x, active)
    cls_attn = score_row(rank["score"], q, k, blk.scale, None, v if rank["value_norm"] else None,
                         rank["weights"]) if rank["row"] else None
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=blk.attn_drop.p if blk.training else 0.0)
    a = a.transpose(1, 2).reshape(B, N, -1)
    x_mlp = blk.mlp_drop(blk.mlp_act(x_mlp))
    if blk.out_proj is not None:
        y = blk.out_proj(torch.cat((a, x_mlp), dim=-1))
    else:
        y = blk.attn_out_proj(a) + blk.mlp_out_proj(x_mlp)
    x = x + blk.drop_path(blk.ls(y))
    return _maybe_reorganize(blk, x, cls_attn, active)


# ----------------------------------------------------------------- the block


def _follow(terms: Terms, st: BlockState) -> Terms:
    """The position terms of the tokens that remain, and with proportional attention the size bias."""
    pos = st.positions.pos if st.positions is not None else None
    if pos is None:
        return terms
    rope = gather_rope(terms.rope, pos) if terms.rope is not None else None
    bias = gather_bias(terms.bias, pos, st.num_prefix) if terms.bias is not None else None
    if st.proportional and st.sequence == 0:
        sizes = size_bias(st.positions.sizes, st.num_prefix)
        bias = sizes if bias is None else bias + sizes
    return Terms(rope, bias, terms.masked)


class EViTBlockMixin(EViTBlock):
    """Forward of any spec'd timm block, as an EViT block or as a follower (its :class:`.block.BlockState`
    in ``self.evit`` says which, and the family's spec).

    An EViT block (a keep rate set) reorganizes its tokens where its layout
    says. A follower (a later block of a family with position terms) only
    gathers its position terms for the tokens that remain. Whenever there is
    nothing to do, the block's own forward runs, unchanged.
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        st: BlockState = self.evit
        pos = st.positions.pos if st.positions is not None else None
        # a rank hook makes it run at keep 1.0 too
        active = st.reorganizes and not runs_dense(st, int(x.shape[1]))
        if st.reorganizes:
            st.kept = None
        if not active and (pos is None or (st.family.position is None and not st.proportional)):
            return super().forward(x, *args, **kwargs)
        terms = st.family.terms(self, *args, **kwargs)
        if terms.masked:
            raise EvitError("EViT blocks take no attention mask: call the model without attn_mask/is_causal")
        x, _ = st.block_spec.layout(self, st.block_spec, x, _follow(terms, st), active)
        return x
