"""What every adapter's EViT block shares: its state and the reorganization step.

An adapter's block computes its attention and the class-attention row its own
way, then calls :func:`reorganize_tokens`; nothing else about EViT lives in
the adapters. Everything EViT keeps on a block is one :class:`BlockState`,
``blk.evit``; the blocks of a model that follow token positions share one
:class:`PositionState`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..algorithm.reorg import follow_positions, follow_sizes, num_kept, reorganize, reorganize_padded, squeeze
from ..algorithm.restore import Restore, RestoreSpec
from ..algorithm.restore import step as restore_step


class PositionState:
    """Per-forward positions of a model's tokens, shared by its blocks (like ToMe's ``_tome_info``).

    ``pos`` (B, M) holds, per image, the original patch index of each non-prefix token, -1 for
    the fused token (``None`` while no token was removed); see ``reorg.follow_positions``.
    """

    def __init__(self, track_sizes: bool = False, weighs_pool: bool = False):
        self.running = False  # inside a forward (entry points nest: forward runs forward_features)
        self.weighs_pool = weighs_pool  # the head's pool weighs each token by the patches it holds
        self.pos: Tensor | None = None
        self.track_sizes = track_sizes  # follow ``sizes`` too (only proportional attention reads them)
        self.sizes: Tensor | None = None  # (B, M) patches each token holds
        self.after: dict[int, Tensor] = {}  # block index -> positions after that block
        self.restore_with = RestoreSpec()  # how removed patches are put back (algorithm/restore.py)
        self.restoring = False  # whether this forward follows the restore (full patch-grid maps asked for)
        self.restore: Restore | None = None  # the patch grid from the tokens that remain (None: identity)
        self.restores: dict[int, Restore] = {}  # block index -> the restore after that block
        # (B, N) bool, the valid tokens of this forward's padded input (SigLIP 2's patch mask), set before the first
        # block by the tower's hook; None where every token is valid. Not reset: the hook sets it every forward.
        self.padding: Tensor | None = None

    def reset(self) -> None:
        self.pos, self.sizes, self.after, self.restore, self.restores = None, None, {}, None, {}

    @contextmanager
    def run(self):
        """One forward with fresh positions; a nested entry point (forward_features inside forward) shares
        the outer one's, so that the head still sees the sizes of the tokens that remain."""
        if self.running:
            yield self
            return
        self.reset()
        self.running = True
        try:
            yield self
        finally:
            self.running = False
            self.reset()

    def prefix_and_sizes(self, num_prefix: int, x: Tensor) -> Tensor | None:
        """(B, P + M) patches each token of ``x`` holds, prefix tokens 1 (``None``: no token removed yet, or
        sizes not followed)."""
        if self.sizes is None or self.sizes.shape[1] + num_prefix != x.shape[1]:
            return None
        return torch.cat([self.sizes.new_ones(self.sizes.shape[0], num_prefix), self.sizes], dim=1)

    def candidate_sizes(self, num_prefix: int, x: Tensor) -> Tensor | None:
        """(B, M) patches each candidate of ``x`` holds, 0 for a padded one, in a padded batch (``None`` in others):
        the sizes once a token was removed, else the input's patch mask."""
        if self.padding is None:
            return None
        if self.sizes is not None and self.sizes.shape[1] + num_prefix == x.shape[1]:
            return self.sizes
        return self.padding[:, num_prefix:].to(x.dtype) if self.padding.shape[1] == x.shape[1] else None

    def weights(self, num_prefix: int, x: Tensor) -> Tensor | None:
        """(B, P + M) patches each token of ``x`` holds (prefix 1; padded tokens 0), where followed or padded."""
        held = self.prefix_and_sizes(num_prefix, x)
        if held is None and (held := self.candidate_sizes(num_prefix, x)) is not None:
            held = torch.cat([held.new_ones(held.shape[0], num_prefix), held], dim=1)
        return held

    def follow(self, index: int, kept: Tensor, m: int, fuse: bool, sizes: Tensor | None = None,
               tokens: tuple[Tensor, Tensor] | None = None, kept_changed: bool = False) -> None:
        """Block ``index`` kept ``kept`` (B, k) of its ``m`` candidates (``sizes``: the new sizes, where the
        block computed them itself, as the ``squeeze`` method does; ``tokens``: its candidates before and
        after, which the restore of the full patch grid follows while ``restoring``; ``kept_changed``: the
        reorganization changed the kept tokens, as the ``squeeze`` method does)."""
        if self.restoring and tokens is not None:
            self.restore = restore_step(self.restore, tokens[0], tokens[1], kept, self.restore_with, kept_changed)
            self.restores[index] = self.restore
        if sizes is not None:
            self.sizes = sizes
        elif self.track_sizes:
            self.sizes = follow_sizes(self.sizes, kept, m, fuse)
        self.pos = follow_positions(self.pos, kept, m, fuse)
        self.after[index] = self.pos


@dataclass(eq=False)
class BlockState:
    """Everything EViT keeps on one block (``blk.evit``); removing it is one ``del``."""

    index: int  # the block's layer, 0-based
    num_prefix: int  # class (+ distillation, register) tokens first in its sequence
    family: Any = None  # the adapter's spec of the model's family
    block_spec: Any = None  # timm: the spec of the block's class (where EViT goes in it)
    sequence: int = 0  # which token sequence (a CrossViT branch); 0: the reported one
    positions: PositionState | None = None  # shared by the model's blocks when positions are followed
    keep_rate: float | None = None  # None: the block only follows positions
    fuse: bool = True
    proportional: bool = False  # later attention weighs each token by the patches it holds
    method: str = "evit"  # "evit" (the paper's) or "squeeze" (see docs/algorithm.md)
    score: str = "cls"  # what ranks the tokens (config.SCORES)
    probe: Callable | None = None  # score "probe": (x (B, N, C), sizes (B, N) or None) -> (B, N) the pool's row
    record: bool = False  # keep the indices of the kept tokens in ``kept``
    kept: Tensor | None = None
    rank: Callable | None = None  # (blk, x, cls_attn) -> (B, N) scores or None: chooses instead (an oracle)
    bias_tables: tuple = field(default_factory=tuple)  # transformers: the (shared, per-layer) bias modules
    patch_size: int = 0  # transformers relative-position families: pixels per patch

    @property
    def reorganizes(self) -> bool:
        return self.keep_rate is not None

    @property
    def value_norm(self) -> bool:
        """Whether the block's ranking row weighs each head's class attention by its value norms."""
        return self.method == "squeeze"

    @property
    def row_score(self) -> str | None:
        """The ranking row its attention computes (``None``: none there, the probe ranks after it)."""
        return None if self.score == "probe" else self.score

    def size_weights(self, x: Tensor) -> Tensor | None:
        """(B, N) patches each token of ``x`` holds (prefix 1), where followed; the mean query weighs by them."""
        return self.positions.weights(self.num_prefix, x) if self.positions is not None else None

    def valid_tokens(self, x: Tensor) -> Tensor | None:
        """(B, N) bool, the tokens of ``x`` that are not padding, in a padded batch (SigLIP 2); ``None`` in others."""
        held = self.positions.candidate_sizes(self.num_prefix, x) if self.positions is not None else None
        if held is None:
            return None
        return torch.cat([held.new_ones(held.shape[0], self.num_prefix, dtype=torch.bool), held > 0], dim=1)


class EViTBlock:
    """Base of every adapter's EViT block mixin: a block whose state is ``self.evit``."""

    evit: BlockState


def state_of(module: nn.Module) -> BlockState | None:
    """The EViT state of a block (``None`` for any other module)."""
    return module.__dict__.get("evit") if isinstance(module, EViTBlock) else None


def set_restore(model: nn.Module, spec: RestoreSpec) -> None:
    """Put ``model``'s removed patches back as ``spec`` says: on the position state its blocks share."""
    for module in model.modules():
        st = state_of(module)
        if st is not None and st.positions is not None:
            st.positions.restore_with = spec


def restore_in(model: nn.Module) -> RestoreSpec | None:
    """How ``model``'s removed patches are put back now (``None``: its blocks follow no positions)."""
    st = next((s for s in map(state_of, model.modules()) if s is not None and s.positions is not None), None)
    return None if st is None else st.positions.restore_with


def clear_block(blk: nn.Module) -> None:
    blk.__dict__.pop("evit", None)


def runs_dense(state: BlockState, num_tokens: int) -> bool:
    """True when the block would remove no token and nobody watches its ranking: it may take
    its family's own dense forward. With a ``rank`` hook (an oracle, or a model used as one)
    the EViT path runs at every keep rate, so the hook sees each batch's class attention."""
    m = int(num_tokens) - state.num_prefix
    return num_kept(m, state.keep_rate) >= m and state.rank is None


def reorganize_tokens(blk: nn.Module, x: Tensor, cls_attn: Tensor) -> tuple[Tensor, Tensor | None]:
    """The EViT step of one block: rank, keep, fuse, record the kept indices, follow the positions.

    ``blk.evit.rank``, when set, chooses the kept tokens instead of the block's
    own class attention (training with an oracle). Returns the new sequence and
    the kept indices among the non-prefix tokens (``None`` when nothing was removed).
    """
    st: BlockState = blk.evit
    if st.score == "probe":  # the pooling head's own query ranks (and weighs) the tokens
        cls_attn = st.probe(x, st.size_weights(x))
    rank = st.rank(blk, x, cls_attn) if st.rank is not None else None
    m = int(x.shape[1]) - st.num_prefix  # a constant when traced: counts depend on the input size only
    sizes, before = None, x[:, st.num_prefix:]
    held = st.positions.candidate_sizes(st.num_prefix, x) if st.positions is not None else None
    if held is not None:  # a padded batch: each image keeps its own share of its valid tokens
        x, kept, sizes = reorganize_padded(x, cls_attn, held, st.num_prefix, st.keep_rate, st.fuse, rank=rank,
                                           mean=st.score != "cls")
        fuse = st.fuse
    elif st.method == "squeeze":
        # squeezed tokens join kept ones: no extra token, and the kept tokens' sizes grow
        held = st.positions.sizes if st.positions is not None else None
        x, kept, sizes = squeeze(x, cls_attn, st.num_prefix, st.keep_rate, held, rank=rank)
        fuse = False
    else:
        x, kept = reorganize(x, cls_attn, st.num_prefix, st.keep_rate, st.fuse, rank=rank, mean=st.score != "cls")
        fuse = st.fuse
    if st.record:
        st.kept = kept
    # positions follow the reported sequence; the families with several (CrossViT) have no position terms
    if kept is not None and st.positions is not None and st.sequence == 0:
        st.positions.follow(st.index, kept, m, fuse, sizes, (before, x[:, st.num_prefix:]),
                            kept_changed=st.method == "squeeze")
    return x, kept
