"""Entry points of a timm EViT model: each forward starts with fresh token positions.

``forward_intermediates`` with ``output_fmt="NLC"`` returns, per block, the
non-prefix tokens that remain after it; with ``"NCHW"`` (timm's default,
used by ``features_only``) each kept token goes back to its patch and every
other patch holds the fused token that absorbed it (zeros without fusion),
so the maps have the dense model's shape.
"""

from __future__ import annotations

import inspect

import torch
from timm.models._features import feature_take_indices
from torch import Tensor

from ...algorithm.state import model_state
from ...errors import EvitError
from ..block import PositionState
from ..swap import original
from .families import family_of


def _grid(y: Tensor, pos: Tensor, num_patches: int) -> Tensor:
    """Tokens (B, M, C) back on the patch grid (B, num_patches, C): each kept token at its
    patch, every other patch holds the fused token that absorbed it (zero without fusion)."""
    B, _, C = y.shape
    fused = pos[:, -1:] < 0
    filler = torch.where(fused[..., None], y[:, -1:], torch.zeros_like(y[:, -1:]))
    grid = torch.cat([filler.expand(B, num_patches, C), y.new_zeros(B, 1, C)], dim=1)
    idx = torch.where(pos < 0, num_patches, pos)
    return grid.scatter(1, idx[..., None].expand(B, idx.shape[1], C), y)[:, :num_patches]


def _maps(ys: list, positions: list[Tensor | None], hw: tuple[int, int]) -> list:
    """timm's NLC intermediates (or (tokens, prefix) pairs) as NCHW maps of the patch grid."""
    H, W = hw

    def to_map(y: Tensor, pos: Tensor | None) -> Tensor:
        y = y if pos is None else _grid(y, pos, H * W)
        return y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()

    return [(to_map(y[0], p), y[1]) if isinstance(y, tuple) else to_map(y, p) for y, p in zip(ys, positions)]


class EViTModelMixin:
    """Entry points of an EViT model: each runs with fresh token positions.

    ``forward_intermediates`` with ``output_fmt="NLC"`` returns, per block, the
    non-prefix tokens that remain after it; with ``"NCHW"`` (timm's default,
    used by ``features_only``) each kept token goes back to its patch and every
    other patch holds the fused token that absorbed it (zeros without fusion),
    so the maps have the dense model's shape.
    """

    def forward_features(self, *args, **kwargs):
        self._evit_check_call(args, kwargs)
        with self._evit_run():
            return super().forward_features(*args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        self._evit_check_call((x, *args), kwargs)
        bound = inspect.signature(super().forward_intermediates).bind(x, *args, **kwargs)
        bound.apply_defaults()
        fmt = bound.arguments.get("output_fmt", "NCHW")
        if fmt != "NLC" and family_of(self).feat_size is None:
            raise EvitError(f"{original(type(self)).__name__} after EViT gives its intermediates as the tokens that "
                            "remain only: call forward_intermediates with output_fmt='NLC'")
        bound.arguments["output_fmt"] = "NLC"
        with self._evit_run() as state:
            out = super().forward_intermediates(*bound.args, **bound.kwargs)
            if fmt == "NLC":
                return out
            take, _ = feature_take_indices(len(self.blocks), bound.arguments.get("indices"))
            positions = self._evit_positions(sorted(take), state)
        hw = family_of(self).feat_size(self, tuple(x.shape[-2:]))
        if isinstance(out, dict):
            return {**out, "image_intermediates": _maps(out["image_intermediates"], positions, hw)}
        if bound.arguments.get("intermediates_only"):
            return _maps(out, positions, hw)
        return out[0], _maps(out[1], positions, hw)

    def _evit_positions(self, take: list[int], state: PositionState) -> list[Tensor | None]:
        """Positions of the tokens after each block in ``take`` (None: nothing removed yet)."""
        result, pos = [], None
        for i in range(max(take, default=-1) + 1):
            pos = state.after.get(i, pos)
            if i in take:
                result.append(pos)
        return result

    def _evit_check_call(self, args: tuple, kwargs: dict) -> None:
        refuse = family_of(self).call_refusal
        why = refuse(args, kwargs) if refuse is not None else None
        if why:
            raise EvitError(why)

    def _evit_run(self):
        if family_of(self).position is not None and getattr(self, "grad_checkpointing", False) and self.training:
            raise EvitError("EViT with position terms does not support gradient checkpointing: call "
                            "model.set_grad_checkpointing(False)")
        return model_state(self).positions.run()
