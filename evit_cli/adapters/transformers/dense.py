"""Dense-prediction models (backbones, depth, segmentation): the removed patches put back.

Their heads read every patch of some of the encoder's hidden states (``Dinov2Backbone``'s feature
maps, Depth Anything's, DPT's and BEiT segmentation's necks). A converted one follows, in its shared
:class:`..block.PositionState`, how to rebuild every removed patch from the tokens that remain
(``algorithm/restore.py``); a forward hook on the encoder hands the head those hidden states with
the dense model's shapes: the prefix tokens, then the full patch grid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...algorithm.restore import restore
from ..block import PositionState
from .families import DENSE_SUPPORTED


def is_dense(model: nn.Module) -> bool:
    """Whether ``model`` is a dense-prediction class evit serves (its head reads every patch)."""
    return any(c.__name__ in DENSE_SUPPORTED for c in type(model).__mro__)


def encoder_of(root: nn.Module) -> nn.Module:
    """The module whose output holds the hidden states: the encoder (DINOv2's, Data2Vec's), or the model itself
    where it records them and its encoder does not (BEiT's has none, DPT's records nothing)."""
    encoder = getattr(root, "encoder", None)
    if encoder is None:
        return root
    records = "hidden_states" in (getattr(root, "_can_record_outputs", None) or {})
    return root if records and not hasattr(encoder, "_can_record_outputs") else encoder


def read_states(model: nn.Module, root: nn.Module) -> set[int] | None:
    """The hidden states (0: the embeddings; ``i``: after layer ``i``) the model's head reads: a
    backbone's ``out_indices`` (stage ``i`` is state ``i``), BEiT segmentation's ``config.out_indices``
    (it reads state ``i - 1``), DPT's ``config.backbone_out_indices`` (state ``i + 1``); ``None``: all
    of them, and ``last_hidden_state``."""
    for owner in (model, getattr(model, "backbone", None), root):  # a backbone, or a head's
        if hasattr(owner, "stage_names") and getattr(owner, "out_indices", None) is not None:
            return {int(i) for i in owner.out_indices}
    dpt = getattr(model.config, "backbone_out_indices", None)
    if dpt is not None:  # the hybrid DPT reads BiT's maps in place of the first two
        return {int(i) + 1 for i in dpt[2 if getattr(model.config, "is_hybrid", False) else 0:]}
    out = getattr(model.config, "out_indices", None)
    return {int(i) - 1 for i in out} if out is not None else None


class RestoreHiddenStates:
    """Forward hook of the encoder of a dense model: the hidden states its head reads on the full patch grid.

    State ``i`` (0: the embeddings; ``i``: after layer ``i``) is rebuilt with the restore after the
    last reorganizing layer before it; the model's own states where nothing was removed yet. The
    states the head does not read (``wanted``) keep the tokens that remain, as in any EViT model."""

    def __init__(self, positions: PositionState, num_prefix: int, wanted: set[int] | None = None):
        self.positions, self.num_prefix, self.wanted = positions, num_prefix, wanted

    def full(self, h: Tensor, layer: int) -> Tensor:
        """``h`` (B, N, C) after 0-based ``layer`` (-1: the embeddings) as (B, P + patches, C)."""
        done = [i for i in self.positions.restores if i <= layer]
        if not done or h is None or h.dim() != 3:  # None: a state the caller did not select
            return h
        p = self.num_prefix
        return torch.cat([h[:, :p], restore(h[:, p:], self.positions.restores[max(done)])], dim=1)

    def __call__(self, module: nn.Module, args, output):
        if not self.positions.restores:
            return output
        states = getattr(output, "hidden_states", None)
        if states is not None:
            output["hidden_states"] = tuple(self.full(h, i - 1) if self.wanted is None or i in self.wanted else h
                                            for i, h in enumerate(states))
        last = getattr(output, "last_hidden_state", None)
        if last is not None and self.wanted is None:
            output["last_hidden_state"] = self.full(last, max(self.positions.restores))
        return output


def install(model: nn.Module, root: nn.Module, positions: PositionState, num_prefix: int) -> None:
    """Follow the restore in every forward, and restore the hidden states the head reads."""
    positions.restoring = True
    encoder_of(root).register_forward_hook(RestoreHiddenStates(positions, num_prefix, read_states(model, root)))


def uninstall(root: nn.Module) -> None:
    hooks = encoder_of(root)._forward_hooks
    for key in [k for k, fn in hooks.items() if isinstance(fn, RestoreHiddenStates)]:
        hooks.pop(key)
