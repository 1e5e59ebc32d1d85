"""The timm families EViT supports, one declarative spec each.

A family says which model class it is, which block classes it holds and, per
block class, its layout (where EViT goes), its layer-scale attributes and how
to read q/k/v from each attention class; and how a block call carries its
position terms. Adding a family is adding a spec here (and a test); the
forward is the generic one of ``timm_blocks``.

| family | timm classes | EViT goes | position terms |
|---|---|---|---|
| ViT / DeiT / CLIP / DINOv2 / SigLIP-with-class-token | ``VisionTransformer`` (+ ``Distilled``): ``Block``, ``ResPostBlock`` | between attention and FFN | absolute, added before block 1 |
| parallel ViT | ``ParallelThingsBlock`` | between the attention sum and the FFN sum | absolute |
| parallel ViT (ViT-22B style) | ``ParallelScalingBlock`` | after the block (attention and MLP share one input) | absolute |
| EVA / EVA-02 / EVA-02 CLIP / DINOv3 / PE / RoPE-ViT | ``Eva``: ``EvaBlock``, ``EvaBlockPostNorm`` | between attention and FFN | RoPE, gathered for the kept tokens |
| BEiT / BEiTv2 | ``Beit``: ``Block`` | between attention and FFN | relative-position bias, gathered |
| ViT with relative positions | ``VisionTransformerRelPos``: ``RelPosBlock``, ``ResPostRelPosBlock`` | between attention and FFN | relative-position bias (MLP or table, own or shared), gathered |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from timm.layers import Attention, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock, VisionTransformerRelPos
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)

from . import timm_blocks as tb


@dataclass(frozen=True)
class BlockSpec:
    """One block class: where EViT goes in it and how to read it."""

    block: type
    layout: Callable  # one of timm_blocks' layouts
    attentions: dict = field(default_factory=dict)  # attention class -> q/k/v reader; {} when the block has its own
    layer_scale: tuple[str, str] = ("ls1", "ls2")
    attn_path: str | None = "attn"  # where the attention module(s) live, for the support check

    def reader(self, attn):
        return self.attentions[type(attn)]


@dataclass(frozen=True)
class ModelSpec:
    """One model class: its blocks and how a block call carries position terms."""

    name: str
    model: type
    blocks: tuple[BlockSpec, ...]
    terms: Callable  # (block, *call args) -> timm_blocks.Terms
    position: str | None = None  # None, "rope" or "relpos": later blocks must follow the kept tokens

    def block_spec(self, cls: type) -> BlockSpec | None:
        return next((b for b in self.blocks if b.block is cls), None)


def vit_terms(blk, attn_mask=None, is_causal=False) -> tb.Terms:
    return tb.Terms(masked=attn_mask is not None or bool(is_causal))


def eva_terms(blk, rope=None, attn_mask=None, is_causal=False) -> tb.Terms:
    return tb.Terms(rope=rope, masked=attn_mask is not None or bool(is_causal))


def beit_terms(blk, shared_rel_pos_bias=None) -> tb.Terms:
    """BEiT's bias: the block's own relative-position table, plus the model's shared one."""
    bias = blk.attn._get_rel_pos_bias() if blk.attn.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if bias is not None and bias.dim() == 3:  # the shared module's (H, N, N)
        bias = bias.unsqueeze(0)
    return tb.Terms(bias=bias)


def relpos_terms(blk, shared_rel_pos=None) -> tb.Terms:
    """timm's ``RelPosAttention``: its own bias (zero rows for the prefix tokens) or else the model's shared one."""
    rel = blk.attn.rel_pos
    return tb.Terms(bias=rel.get_bias() if rel is not None else shared_rel_pos)


VIT_ATTENTION = {Attention: tb.fused_qkv}
EVA_ATTENTION = {EvaAttention: tb.eva_qkv, AttentionRope: tb.eva_qkv}

FAMILIES = (
    ModelSpec(
        name="ViT",
        model=VisionTransformer,
        blocks=(
            BlockSpec(Block, tb.pre_norm, VIT_ATTENTION),
            BlockSpec(ResPostBlock, tb.post_norm, VIT_ATTENTION),
            BlockSpec(ParallelThingsBlock, tb.parallel_branches, VIT_ATTENTION, attn_path="attns"),
            BlockSpec(ParallelScalingBlock, tb.parallel_scaling, attn_path=None),
        ),
        terms=vit_terms,
    ),
    ModelSpec(
        name="EVA",
        model=Eva,
        blocks=(
            BlockSpec(EvaBlock, tb.pre_norm, EVA_ATTENTION, layer_scale=("gamma_1", "gamma_2")),
            BlockSpec(EvaBlockPostNorm, tb.post_norm, EVA_ATTENTION),
        ),
        terms=eva_terms,
        position="rope",
    ),
    ModelSpec(
        name="BEiT",
        model=Beit,
        blocks=(BlockSpec(BeitBlock, tb.pre_norm, {BeitAttention: tb.fused_qkv_biases}, layer_scale=("gamma_1", "gamma_2")),),
        terms=beit_terms,
        position="relpos",
    ),
    ModelSpec(
        name="ViT-RelPos",
        model=VisionTransformerRelPos,
        blocks=(
            BlockSpec(RelPosBlock, tb.pre_norm, {RelPosAttention: tb.fused_qkv}),
            BlockSpec(ResPostRelPosBlock, tb.post_norm, {RelPosAttention: tb.fused_qkv}),
        ),
        terms=relpos_terms,
        position="relpos",
    ),
)


def family_of(model) -> ModelSpec | None:
    """The spec of ``model``'s class (or of its nearest spec'd base class)."""
    for cls in type(model).__mro__:
        for fam in FAMILIES:
            if fam.model is cls:
                return fam
    return None
