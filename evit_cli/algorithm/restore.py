"""Putting the removed tokens back: full patch-grid maps from the tokens that remain (docs/algorithm.md).

Nothing in this file knows about a model. A reorganizing block hands :func:`step` its
candidate tokens before and after the reorganization and the indices it kept; the result,
a :class:`Restore`, says for every original patch how to rebuild it from the tokens that
remain: ``grid = offset + matrix @ tokens`` (:func:`restore`). Each strategy is a choice of
the weights ``W`` (removed token -> new tokens) and of the offset:

- ``"fused"``: a removed patch holds the fused token that absorbed it (zero without fusion);
- ``"reconstruct"``: a removed token is the softmax-weighted mean of the kept tokens, weighted
  by its cosine similarity to them at the moment it was removed (Liang et al., NeurIPS 2022);
- ``"delta"``: its own value when it was removed, plus what those same weighted kept tokens
  have changed since: ``x_j + sum_i W_ji (y_i(t) - y_i(s))``; a kept token likewise keeps its own
  value plus its change, ``x_i + y_i(t) - y_i(s)`` (``y_i(s) = x_i`` except where the ``squeeze``
  method averaged other tokens into it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import EvitError

STRATEGIES = ("fused", "reconstruct", "delta")
DEFAULT_STRATEGY = "delta"  # chosen by benchmarks/dense_real.py (benchmarks/results/dense_real.md)
DEFAULT_TEMPERATURE = 0.05  # ditto: the softmax temperature over cosine similarities


@dataclass(frozen=True)
class RestoreSpec:
    """How removed patches are rebuilt: a strategy of :data:`STRATEGIES`, the softmax
    temperature over cosine similarities and ``top_k`` (0: every kept token, else the
    ``top_k`` most similar ones only)."""

    strategy: str = DEFAULT_STRATEGY
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"restore strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"restore temperature must be a positive number, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"restore top_k must be a whole number >= 0 (0: every kept token), got {self.top_k!r}")

    def text(self) -> str:
        """``strategy:temperature[:top_k]``, as :func:`parse_restore` reads it (``delta:0.05``)."""
        return f"{self.strategy}:{self.temperature:g}" + (f":{self.top_k}" if self.top_k else "")

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "temperature": self.temperature, "top_k": self.top_k}


RESTORE_EXAMPLE = "delta, reconstruct:0.05 or delta:0.05:8"


def parse_restore(value, option: str = "restore") -> RestoreSpec:
    """The restore setting of a converted model: ``"strategy[:temperature[:top_k]]"`` (a strategy of
    :data:`STRATEGIES`, the softmax temperature, the number of most similar kept tokens; ``"reconstruct:0.05"``),
    a :class:`RestoreSpec`, or the dict of :meth:`RestoreSpec.to_dict`; else the one-line error naming ``option``."""
    if isinstance(value, RestoreSpec):
        return value
    try:
        if isinstance(value, dict):
            return RestoreSpec(str(value["strategy"]), float(value.get("temperature", DEFAULT_TEMPERATURE)),
                               int(value.get("top_k", 0)))
        if not isinstance(value, str):
            raise ValueError(f"a {type(value).__name__}, not a string")
        parts = [p.strip() for p in value.split(":")]
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"a strategy of {', '.join(STRATEGIES)} and at most two numbers")
        temperature = float(parts[1]) if len(parts) > 1 else DEFAULT_TEMPERATURE
        return RestoreSpec(parts[0], temperature, *([int(parts[2])] if len(parts) > 2 else []))
    except (ValueError, KeyError, TypeError) as e:
        why = str(e) if not isinstance(e, KeyError) else f"it has no {e}"
        raise EvitError(f"{option} {value!r} is not a restore setting ({why}): use strategy[:temperature[:top_k]], "
                        f"e.g. {RESTORE_EXAMPLE}") from None


class Restore(NamedTuple):
    """Per image, each original patch as ``offset + matrix @ tokens`` of the remaining tokens.

    ``matrix`` (B, P, M): P patches over the M non-prefix tokens that remain; ``offset``
    (B, P, C) or ``None`` (zero)."""

    matrix: Tensor
    offset: Tensor | None = None


def removed_indices(kept: Tensor, m: int) -> Tensor:
    """The candidates not in ``kept`` (B, k), in increasing order: (B, m - k)."""
    mask = torch.ones(kept.shape[0], m, dtype=torch.bool, device=kept.device).scatter(1, kept, False)
    order = torch.arange(m, device=kept.device).expand(kept.shape[0], m)
    # removed ones first (keys 0..m-1), kept ones after (keys m..2m-1): a stable order without a boolean index
    keys = torch.where(mask, order, order + m)
    return keys.argsort(dim=1)[:, : m - kept.shape[1]]


def similarity_weights(removed: Tensor, kept: Tensor, temperature: float, top_k: int = 0) -> Tensor:
    """``W`` (B, r, k): for each removed token (B, r, C) a softmax over the kept ones (B, k, C) of
    ``cos(x_j, x_i) / temperature``; with ``top_k`` only the ``top_k`` most similar keep weight."""
    unit_r = removed / removed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_k = kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = (unit_r @ unit_k.transpose(1, 2)).float() / temperature
    if 0 < top_k < logits.shape[-1]:
        low = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < low, float("-inf"))
    return logits.softmax(dim=-1).to(removed.dtype)


def _columns(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(2, idx[:, None, :].expand(t.shape[0], t.shape[1], idx.shape[1]))


def _rows(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def step(state: Restore | None, before: Tensor, after: Tensor, kept: Tensor, spec: RestoreSpec,
         kept_changed: bool = False) -> Restore:
    """The restore after one reorganization: ``before`` (B, M, C) the candidates it ranked, ``after``
    (B, k [+ 1], C) the candidates it left (the kept ones, in ``kept``'s order, then the fused token
    where it made one), ``kept`` (B, k) their indices among ``before``; ``kept_changed``: the kept
    tokens are not their candidates unchanged (the ``squeeze`` method averaged others into them).
    ``state`` ``None``: every patch is still its own token (the identity)."""
    b, m, _ = before.shape
    k, cols = kept.shape[1], after.shape[1]
    rm = removed_indices(kept, m)
    eye = torch.eye(m, device=before.device, dtype=before.dtype).expand(b, m, m)
    matrix = eye if state is None else state.matrix
    x_rm = _rows(before, rm)
    if spec.strategy == "fused":
        w = torch.zeros(b, rm.shape[1], cols, device=before.device, dtype=before.dtype)
        if cols > k:
            w[..., k] = 1.0
    else:
        w = similarity_weights(x_rm, after[:, :k], spec.temperature, spec.top_k)
        w = torch.cat([w, w.new_zeros(b, rm.shape[1], cols - k)], dim=2)
    to_rm = _columns(matrix, rm)  # (B, P, r): how much of each removed token every patch held
    to_kept = _columns(matrix, kept)  # (B, P, k): and of each kept one
    kept_cols = torch.cat([to_kept, matrix.new_zeros(b, matrix.shape[1], cols - k)], dim=2)
    new = Restore(kept_cols + to_rm @ w, None if state is None else state.offset)
    if spec.strategy == "delta":  # each removed token keeps what its weighted kept tokens do not explain,
        # and a kept token what the reorganization changed of it (nothing for EViT's; the squeezed-in tokens)
        add = to_rm @ (x_rm - w @ after)
        if kept_changed:
            add = add + to_kept @ (_rows(before, kept) - after[:, :k])
        new = Restore(new.matrix, add if new.offset is None else new.offset + add)
    return new


def restore(tokens: Tensor, state: Restore | None) -> Tensor:
    """The full grid (B, P, C) from the remaining non-prefix ``tokens`` (B, M, C); ``state``
    ``None``: nothing was removed, ``tokens`` is the grid already."""
    if state is None:
        return tokens
    grid = state.matrix.to(tokens.dtype) @ tokens
    return grid if state.offset is None else grid + state.offset.to(tokens.dtype)
