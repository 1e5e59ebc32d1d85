"""Position terms that follow the kept tokens: RoPE (DINOv3, MLCD), YOLOS's detection tokens and
its per-layer position embeddings. (Relative position bias: :mod:`.relpos`.)

The positions themselves are followed as for every family (``reorg.follow_positions``,
in the model's shared :class:`..block.PositionState`): ``pos`` (B, M) holds the original
patch index of each remaining patch token, -1 for the fused token, which has no position:

- RoPE: every layer after a reorganization rotates each token by its original
  patch's angles (``reorg.gather_rope``); the fused token is not rotated, as the
  prefix tokens (a prefix token with its own rotation, MLCD's class token, keeps it);
- YOLOS's mid position embeddings, added after every layer but the last: each token
  gets its original patch's row, the detection and class tokens theirs, the fused
  token none (zero).

YOLOS's detection tokens come last in the sequence: the EViT step sees them as
prefix tokens (kept, never ranked), and puts them back at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...algorithm.reorg import gather_rope
from ..block import BlockState, reorganize_tokens
from .families import resolve


def _suffix(layer: nn.Module) -> int:
    """The tokens the family keeps last (YOLOS's detection tokens); 0 for the others."""
    spec = layer.evit.family
    if not spec.suffix_config:
        return 0
    return int(getattr(resolve(getattr(layer, spec.attention), spec.config), spec.suffix_config))


def reorganize(layer: nn.Module, x: Tensor, cls_attn: Tensor) -> Tensor:
    """The EViT step on ``[prefix, patches, suffix]``: the suffix tokens are kept, and stay last."""
    s = _suffix(layer)
    if not s:
        return reorganize_tokens(layer, x, cls_attn)[0]
    p = layer.evit.num_prefix - s

    def suffix_first(t: Tensor) -> Tensor:
        return torch.cat([t[:, :p], t[:, -s:], t[:, p:-s]], 1)

    x, _ = reorganize_tokens(layer, suffix_first(x), suffix_first(cls_attn))
    return torch.cat([x[:, :p], x[:, p + s:], x[:, p:p + s]], 1)


# --------------------------------------------------------------------------- RoPE


def rope_for(layer: nn.Module, cos_sin) -> tuple[Tensor, Tensor]:
    """The layer's (cos, sin) for the tokens that remain: the full ones until a token was removed,
    then (B, 1, R, D) rows gathered at the original positions (layer 0 resets the positions)."""
    st: BlockState = layer.evit
    pos = st.positions.pos
    if pos is None:
        return cos_sin
    cos, sin = cos_sin
    rows = st.family.rope_prefix_rows
    table = torch.cat([sin[..., rows:, :], cos[..., rows:, :]], -1)  # reorg.gather_rope's [sin, cos] layout
    sin_p, cos_p = gather_rope(table, pos).chunk(2, dim=-1)
    b = pos.shape[0]
    head = [t[..., :rows, :].expand(b, 1, rows, t.shape[-1]) for t in (cos, sin)]
    return torch.cat([head[0], cos_p], -2), torch.cat([head[1], sin_p], -2)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` (B, H, N, D) with its last ``R`` tokens rotated by ``cos``/``sin`` (..., R, D), as the
    families do (``x * cos + rotate_half(x) * sin``, in the dtype they promote to); the others unrotated."""
    r = cos.shape[-2]
    tail = x[..., x.shape[-2] - r:, :]
    tail = (tail * cos + _rotate_half(tail) * sin).to(x.dtype)
    return torch.cat([x[..., : x.shape[-2] - r, :], tail], -2)


# --------------------------------------------------------------------------- YOLOS's mid position embeddings


class FollowingRows:
    """The per-layer position embeddings (L-1, 1, N0, C) an encoder adds after layer ``i``, as
    ``[i]``: the rows of the tokens that remain then (the current positions of ``state``)."""

    def __init__(self, full: Tensor, state, prefix: int, suffix: int):
        self.full, self.state, self.prefix, self.suffix = full, state, prefix, suffix

    def __getitem__(self, i: int) -> Tensor:
        rows, pos = self.full[i], self.state.pos
        if pos is None:
            return rows
        p, s = self.prefix, self.suffix
        patches = rows[:, p:rows.shape[1] - s]
        padded = torch.cat([patches, patches.new_zeros(1, 1, patches.shape[-1])], 1)  # the fused token: zero
        idx = torch.where(pos < 0, patches.shape[1], pos)  # (B, M)
        gathered = padded.expand(pos.shape[0], -1, -1).gather(1, idx.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
        b = pos.shape[0]
        return torch.cat([rows[:, :p].expand(b, -1, -1), gathered, rows[:, rows.shape[1] - s:].expand(b, -1, -1)], 1)


class FollowMidPositions:
    """Forward hook of the module computing the per-layer position embeddings (YOLOS's
    ``encoder.interpolation``): resets the positions (it runs before the first layer) and
    hands the encoder :class:`FollowingRows` instead of the full table."""

    def __init__(self, state: BlockState):
        self.state = state

    def __call__(self, module: nn.Module, args, output):
        st = self.state
        st.positions.reset()
        s = int(getattr(module.config, st.family.suffix_config))
        return FollowingRows(output, st.positions, st.num_prefix - s, s)
