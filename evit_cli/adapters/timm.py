"""EViT for timm Vision Transformers (ViT, DeiT, distilled DeiT, register-token ViTs).

Like ToMe's patches, the chosen ``Block`` modules get a subclass swapped in
(``__class__``), so parameters and state-dict keys stay those of timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..config import EViTConfig
from ..errors import EvitError
from ..reorg import class_attention
from .block import clear_block, reorganize_tokens, runs_dense, setup_block

name = "timm"


def _attention_with_cls(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` that also returns the class-token attention row (B, N)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        cls_attn = class_attention(q[:, :, :1], k, attn.scale)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        cls_attn = a[:, :, 0].float().mean(dim=1)
        x = attn.attn_drop(a) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), cls_attn


class EViTBlock(Block):
    """A timm ``Block`` that reorganizes its tokens between attention and FFN."""

    evit_keep_rate: float
    evit_num_prefix: int
    evit_fuse: bool
    evit_record: bool = False
    evit_kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        # int(...) sizes: constants when traced (token counts are fixed per input size)
        if attn_mask is not None or is_causal or runs_dense(self, int(x.shape[1])):
            self.evit_kept = None
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        a, cls_attn = _attention_with_cls(self.attn, self.norm1(x))
        x = x + self.drop_path1(self.ls1(a))
        x, _ = reorganize_tokens(self, x, cls_attn)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def matches(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def depth(model: VisionTransformer) -> int:
    return len(model.blocks)


def num_prefix_tokens(model: VisionTransformer) -> int:
    return int(model.num_prefix_tokens)


def img_size(model: VisionTransformer) -> int:
    return int(model.patch_embed.img_size[0])


def num_tokens(model: VisionTransformer) -> int:
    """Sequence length entering the first block."""
    return int(model.patch_embed.num_patches) + num_prefix_tokens(model)


def data_config(model: VisionTransformer) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    size = img_size(model)
    cfg["input_size"] = (3, size, size)  # the model's own size, also when built at another one
    return cfg


def class_names(model: VisionTransformer) -> list[str] | None:
    return getattr(model, "evit_class_names", None)


def check(model: VisionTransformer) -> None:
    if getattr(model, "cls_token", None) is None:
        raise EvitError(
            "this ViT has no class token (it pools by global average): EViT ranks tokens by "
            "class-token attention, so pick a model with a class token (e.g. deit_small_patch16_224)"
        )
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, EViTBlock) or type(blk.attn) is not Attention:
            raise EvitError(
                f"block {i + 1} is a {type(blk).__name__} with {type(blk.attn).__name__}: only timm's "
                "standard ViT Block and Attention are supported"
            )


def apply(model: VisionTransformer, cfg: EViTConfig) -> None:
    check(model)
    remove(model)
    for idx, rate in zip(cfg.indices, cfg.keep_rates):
        blk = model.blocks[idx]
        blk.__class__ = EViTBlock
        setup_block(blk, rate, num_prefix_tokens(model), cfg.fuse)


def remove(model: VisionTransformer) -> None:
    for blk in model.blocks:
        if isinstance(blk, EViTBlock):
            blk.__class__ = Block
            clear_block(blk)


def reset_head(model: VisionTransformer, num_classes: int, class_names: list[str]) -> None:
    model.reset_classifier(num_classes)
    set_class_names(model, class_names)
    src = getattr(model, "evit_source", None)
    if src is not None:
        src.setdefault("kwargs", {})["num_classes"] = num_classes


def logits(model: nn.Module, output) -> torch.Tensor:
    if isinstance(output, tuple):  # distilled training mode: class and distillation heads
        return (output[0] + output[1]) / 2
    return output


def num_classes(model: VisionTransformer) -> int:
    return int(model.num_classes)


def set_class_names(model: VisionTransformer, class_names: list[str]) -> None:
    model.evit_class_names = list(class_names)


def set_img_size(model: VisionTransformer, size: int) -> None:
    """Run at ``size`` px: position embeddings resampled (bicubic), as timm does."""
    import logging

    logging.getLogger("timm.layers.pos_embed").setLevel(logging.WARNING)
    model.set_input_size(img_size=(size, size))
    src = getattr(model, "evit_source", None)
    if src is not None:
        src.setdefault("kwargs", {})["img_size"] = size
