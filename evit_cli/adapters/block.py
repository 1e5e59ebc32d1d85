"""What every adapter's EViT block shares: its attributes and the reorganization step.

An adapter's block computes its attention and the class-attention row its own
way, then calls :func:`reorganize_tokens`; nothing else about EViT lives in
the adapters.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..reorg import num_kept, reorganize

# attributes an EViT block carries; ``remove`` pops them all
EVIT_ATTRS = ("evit_keep_rate", "evit_num_prefix", "evit_fuse", "evit_record", "evit_kept", "evit_rank")


def setup_block(blk: nn.Module, keep_rate: float, num_prefix: int, fuse: bool) -> None:
    blk.evit_keep_rate = float(keep_rate)
    blk.evit_num_prefix = int(num_prefix)
    blk.evit_fuse = bool(fuse)


def clear_block(blk: nn.Module) -> None:
    for attr in EVIT_ATTRS:
        blk.__dict__.pop(attr, None)


def runs_dense(blk: nn.Module, num_tokens: int) -> bool:
    """True when the block would remove no token and nobody watches its ranking: it may take
    its family's own dense forward. With an ``evit_rank`` hook (an oracle, or a model used as
    one) the EViT path runs at every keep rate, so the hook sees each batch's class attention."""
    m = int(num_tokens) - blk.evit_num_prefix
    return num_kept(m, blk.evit_keep_rate) >= m and getattr(blk, "evit_rank", None) is None


def reorganize_tokens(blk: nn.Module, x: Tensor, cls_attn: Tensor) -> tuple[Tensor, Tensor | None]:
    """The EViT step of one block: rank, keep, fuse, record the kept indices.

    ``blk.evit_rank``, when set, is a callable ``(blk, x, cls_attn) -> (B, N)
    scores or None`` that chooses the kept tokens instead of the block's own
    class attention (training with an oracle). Returns the new sequence and the
    kept indices among the non-prefix tokens (``None`` when nothing was removed).
    """
    hook = getattr(blk, "evit_rank", None)
    rank = hook(blk, x, cls_attn) if hook is not None else None
    x, kept = reorganize(x, cls_attn, blk.evit_num_prefix, blk.evit_keep_rate, blk.evit_fuse, rank=rank)
    if getattr(blk, "evit_record", False):
        blk.evit_kept = kept
    return x, kept
