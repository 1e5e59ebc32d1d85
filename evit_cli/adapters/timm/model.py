"""Entry points of a timm EViT model: each forward starts with fresh token positions.

``forward_intermediates`` with ``output_fmt="NLC"`` returns, per block, the
non-prefix tokens that remain after it; with ``"NCHW"`` (timm's default,
used by ``features_only``) the removed patches are put back
(``algorithm/restore.py``, the model's ``PositionState.restore_with``), so the
maps have the dense model's shape.
"""

from __future__ import annotations

import inspect

from timm.models._features import feature_take_indices
from torch import Tensor

from ...algorithm.restore import Restore, restore
from ...algorithm.state import model_state
from ...errors import EvitError
from ..block import PositionState
from ..swap import original
from .families import family_of
from .pooling import pool_kind, pooled


def _maps(ys: list, restores: list[Restore | None], hw: tuple[int, int]) -> list:
    """timm's NLC intermediates (or (tokens, prefix) pairs) as NCHW maps of the full patch grid."""
    H, W = hw

    def to_map(y: Tensor, r: Restore | None) -> Tensor:
        y = restore(y, r)
        return y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()

    return [(to_map(y[0], r), y[1]) if isinstance(y, tuple) else to_map(y, r) for y, r in zip(ys, restores)]


class EViTModelMixin:
    """Entry points of an EViT model: each runs with fresh token positions.

    ``forward_intermediates`` with ``output_fmt="NLC"`` returns, per block, the
    non-prefix tokens that remain after it; with ``"NCHW"`` (timm's default,
    used by ``features_only``) the full patch grid, the removed patches put back
    as ``PositionState.restore_with`` says (``algorithm/restore.py``).
    """

    def forward_features(self, *args, **kwargs):
        self._evit_check_call(args, kwargs)
        with self._evit_run():
            return super().forward_features(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The whole forward in one run, so that the pool sees the patches each remaining token holds."""
        self._evit_check_call(args, kwargs)
        with self._evit_run():
            return super().forward(*args, **kwargs)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """timm's pool, each token weighted by the patches it holds where a class-token-free score fused them
        (``pooling.pooled``); the model's own pool while nothing was removed."""
        done = self._evit_pool(x) if pool_type is None else None
        return super().pool(x, pool_type) if done is None else done

    def _pool(self, x: Tensor, pool_type: str | None = None, patch_valid: Tensor | None = None) -> Tensor:
        """NaFlexVit's pool, as :meth:`pool` (its fixed-size mode: no ``patch_valid``)."""
        done = self._evit_pool(x) if pool_type is None and patch_valid is None else None
        return super()._pool(x, pool_type=pool_type, patch_valid=patch_valid) if done is None else done

    def forward_head(self, x: Tensor, pre_logits: bool = False, **kwargs) -> Tensor:
        """The head of a family that pools inside it (BEiT, ViT-RelPos: ``x[:, P:].mean(1)``), with the weighted
        pool of :meth:`pool`; the others' ``forward_head`` calls :meth:`pool` itself."""
        pooled = None if hasattr(super(), "pool") or hasattr(super(), "_pool") else self._evit_pool(x)
        if pooled is None:
            return super().forward_head(x, pre_logits=pre_logits, **kwargs)
        x = self.head_drop(self.fc_norm(pooled))
        return x if pre_logits else self.head(x)

    def _evit_pool(self, x: Tensor) -> Tensor | None:
        positions = model_state(self).positions
        if positions is None or not positions.weighs_pool or pool_kind(self) not in ("avg", "map"):
            return None
        num_prefix = family_of(self).sequences(self)[0].num_prefix
        sizes = positions.prefix_and_sizes(num_prefix, x)
        return None if sizes is None else pooled(self, x, sizes, num_prefix)

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
            state.restoring = fmt != "NLC"
            try:
                out = super().forward_intermediates(*bound.args, **bound.kwargs)
            finally:
                state.restoring = False
            if fmt == "NLC":
                return out
            take, _ = feature_take_indices(len(self.blocks), bound.arguments.get("indices"))
            restores = self._evit_restores(sorted(take), state)
        hw = family_of(self).feat_size(self, tuple(x.shape[-2:]))
        if isinstance(out, dict):
            return {**out, "image_intermediates": _maps(out["image_intermediates"], restores, hw)}
        if bound.arguments.get("intermediates_only"):
            return _maps(out, restores, hw)
        return out[0], _maps(out[1], restores, hw)

    def _evit_restores(self, take: list[int], state: PositionState) -> list[Restore | None]:
        """The restore of the full grid after each block in ``take`` (None: nothing removed yet)."""
        result, current = [], None
        for i in range(max(take, default=-1) + 1):
            current = state.restores.get(i, current)
            if i in take:
                result.append(current)
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
