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
| NaFlexViT with a class token (C-RADIO) | ``NaFlexVit``: ``Block`` | between attention and FFN | absolute, added before block 1 (fixed-size mode: an image tensor) |
| CrossViT | ``CrossVit``: ``Block`` in each branch of a ``MultiScaleBlock`` | between attention and FFN, in each branch | absolute, per branch |

A model runs one token sequence, except CrossViT: two branches (small and
large patches), each with its own class token. For it, layer ``L`` is the
``L``-th multi-scale stage: EViT goes in the first transformer block of each
branch in that stage, each branch ranking its tokens by its own class token's
attention; the branch's other blocks of the stage, the cross-attention fusion
(which reads the other branch's patch tokens, however many) and the later
stages run on the shorter sequences. Both branches are reorganized at the same
layers and rates, so each branch's lengths follow ``reorg.token_counts`` from
its own start; the single-sequence interface (``num_tokens``, token counts,
``evit_blocks``, the visualization) reports branch 0, the small-patch branch,
the longer sequence in every timm CrossViT.
"""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from timm.layers import Attention, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.crossvit import CrossVit
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)

from ...algorithm.state import model_state
from ..base import Sequence
from .blocks import (
    Terms,
    eva_qkv,
    fused_qkv,
    fused_qkv_biases,
    parallel_branches,
    parallel_scaling,
    post_norm,
    pre_norm,
)


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


def vit_layers(model) -> list[tuple]:
    return [(blk,) for blk in model.blocks]


def vit_sequences(model) -> list[Sequence]:
    p = int(model.num_prefix_tokens)
    return [Sequence(int(model.patch_embed.num_patches) + p, p)]


def vit_img_size(model) -> int:
    return int(model.patch_embed.img_size[0])


def vit_feat_size(model, hw: tuple[int, int]) -> tuple[int, int]:
    return model.patch_embed.dynamic_feat_size(hw)


@dataclass(frozen=True)
class ModelSpec:
    """One model class: its blocks, how a block call carries position terms, and where its
    layers, token sequences and input size are (the defaults: a timm ``VisionTransformer``'s)."""

    name: str
    model: type
    blocks: tuple[BlockSpec, ...]
    terms: Callable  # (block, *call args) -> timm_blocks.Terms
    position: str | None = None  # None, "rope" or "relpos": later blocks must follow the kept tokens
    # model -> per layer (1-based in the interface), its transformer block in each sequence
    layers: Callable = vit_layers
    sequences: Callable = vit_sequences  # model -> one Sequence per token sequence, the reported one first
    img_size: Callable = vit_img_size  # model -> the input size (px) it is built for
    feat_size: Callable | None = vit_feat_size  # (model, (H, W)) -> patch grid; None: no feature maps after EViT
    refusal: Callable | None = None  # model -> why this model of the family cannot convert, or None
    call_refusal: Callable | None = None  # (args, kwargs) of an entry point -> why EViT cannot run that call, or None

    def block_spec(self, cls: type) -> BlockSpec | None:
        return next((b for b in self.blocks if b.block is cls), None)


def vit_terms(blk, attn_mask=None, is_causal=False) -> Terms:
    return Terms(masked=attn_mask is not None or bool(is_causal))


def eva_terms(blk, rope=None, attn_mask=None, is_causal=False) -> Terms:
    return Terms(rope=rope, masked=attn_mask is not None or bool(is_causal))


def beit_terms(blk, shared_rel_pos_bias=None) -> Terms:
    """BEiT's bias: the block's own relative-position table, plus the model's shared one."""
    bias = blk.attn._get_rel_pos_bias() if blk.attn.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if bias is not None and bias.dim() == 3:  # the shared module's (H, N, N)
        bias = bias.unsqueeze(0)
    return Terms(bias=bias)


def relpos_terms(blk, shared_rel_pos=None) -> Terms:
    """timm's ``RelPosAttention``: its own bias (zero rows for the prefix tokens) or else the model's shared one."""
    rel = blk.attn.rel_pos
    return Terms(bias=rel.get_bias() if rel is not None else shared_rel_pos)


def naflex_img_size(model) -> int:
    """The size it was built for (``img_size``: kept by its embedding only without a position grid size, so
    also read from what evit built it with), else its pretrained config's (NaFlex takes any size)."""
    size = model.embeds.default_img_size
    built = ((model_state(model).source or {}).get("kwargs") or {}).get("img_size")
    if built is not None:
        size = (built, built) if isinstance(built, int) else tuple(built)
    if size is None:
        size = ((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))[1:]
    return int(size[0])


def naflex_sequences(model) -> list[Sequence]:
    size = naflex_img_size(model)
    h, w = model.embeds.dynamic_feat_size((size, size))
    p = int(model.num_prefix_tokens)
    return [Sequence(h * w + p, p)]


def naflex_feat_size(model, hw: tuple[int, int]) -> tuple[int, int]:
    return model.embeds.dynamic_feat_size(hw)


def naflex_refusal(model) -> str | None:
    if model.rope is not None:
        return "RoPE in a NaFlexVit"
    return None


def naflex_call_refusal(args: tuple, kwargs: dict) -> str | None:
    if any(isinstance(a, dict) for a in (*args, *kwargs.values())) or kwargs.get("patch_coord") is not None:
        return ("EViT runs NaFlexVit in its fixed-size mode only: give an image tensor (B, C, H, W), "
                "not NaFlex patches with coordinates")
    return None


def crossvit_layers(model) -> list[tuple]:
    """Per multi-scale stage: the first transformer block of each branch."""
    return [tuple(branch[0] for branch in stage.blocks) for stage in model.blocks]


def crossvit_sequences(model) -> list[Sequence]:
    return [Sequence(int(pe.num_patches) + 1, 1) for pe in model.patch_embed]


def crossvit_img_size(model) -> int:
    return int(model.img_size[0])


VIT_ATTENTION = {Attention: fused_qkv}
EVA_ATTENTION = {EvaAttention: eva_qkv, AttentionRope: eva_qkv}

FAMILIES = (
    ModelSpec(
        name="ViT",
        model=VisionTransformer,
        blocks=(
            BlockSpec(Block, pre_norm, VIT_ATTENTION),
            BlockSpec(ResPostBlock, post_norm, VIT_ATTENTION),
            BlockSpec(ParallelThingsBlock, parallel_branches, VIT_ATTENTION, attn_path="attns"),
            BlockSpec(ParallelScalingBlock, parallel_scaling, attn_path=None),
        ),
        terms=vit_terms,
    ),
    ModelSpec(
        name="EVA",
        model=Eva,
        blocks=(
            BlockSpec(EvaBlock, pre_norm, EVA_ATTENTION, layer_scale=("gamma_1", "gamma_2")),
            BlockSpec(EvaBlockPostNorm, post_norm, EVA_ATTENTION),
        ),
        terms=eva_terms,
        position="rope",
    ),
    ModelSpec(
        name="BEiT",
        model=Beit,
        blocks=(BlockSpec(BeitBlock, pre_norm, {BeitAttention: fused_qkv_biases}, layer_scale=("gamma_1", "gamma_2")),),
        terms=beit_terms,
        position="relpos",
    ),
    ModelSpec(
        name="ViT-RelPos",
        model=VisionTransformerRelPos,
        blocks=(
            BlockSpec(RelPosBlock, pre_norm, {RelPosAttention: fused_qkv}),
            BlockSpec(ResPostRelPosBlock, post_norm, {RelPosAttention: fused_qkv}),
        ),
        terms=relpos_terms,
        position="relpos",
    ),
    ModelSpec(
        name="NaFlexViT",
        model=NaFlexVit,
        blocks=(BlockSpec(Block, pre_norm, VIT_ATTENTION), BlockSpec(ResPostBlock, post_norm, VIT_ATTENTION)),
        terms=vit_terms,
        sequences=naflex_sequences,
        img_size=naflex_img_size,
        feat_size=naflex_feat_size,
        refusal=naflex_refusal,
        call_refusal=naflex_call_refusal,
    ),
    ModelSpec(
        name="CrossViT",
        model=CrossVit,
        blocks=(BlockSpec(Block, pre_norm, VIT_ATTENTION),),
        terms=vit_terms,
        layers=crossvit_layers,
        sequences=crossvit_sequences,
        img_size=crossvit_img_size,
        feat_size=None,
    ),
)


def family_of(model) -> ModelSpec | None:
    """The spec of ``model``'s class (or of its nearest spec'd base class)."""
    for cls in type(model).__mro__:
        for fam in FAMILIES:
            if fam.model is cls:
                return fam
    return None
