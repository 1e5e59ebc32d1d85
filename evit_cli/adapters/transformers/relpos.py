"""Relative position bias that follows the kept tokens (BEiT, Data2Vec-vision).

The bias tables give one (H, N0, N0) bias for the full sequence of ``N0``
tokens (class token + patches). Once an EViT layer has reorganized the tokens,
every later layer sees ``[class, kept..., fused]``: its bias is the full one
gathered, per image, at the original positions of the tokens that remain.

The fused token has no position of its own: it gets **no bias** (zero), as
query and as key, in every later layer -- the same "no position term" the
fused token gets in the timm RoPE families. A fused token that a later EViT
layer keeps stays position-less.

The positions travel between layers in a small object shared by the model's
layers (``evit_positions``): the first layer resets it, EViT layers update it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families import Family, resolve


class Positions:
    """Original positions (B, N) of the current tokens; ``None`` while no token was removed."""

    def __init__(self):
        self.pos: Tensor | None = None
        self.n0 = 0


_ATTRS = ("evit_positions", "evit_layer_index", "evit_shared_bias", "evit_layer_bias", "evit_patch_size")


def install(layers: nn.ModuleList, spec: Family, root: nn.Module, patch: int) -> None:
    """Give every layer the shared positions state, its patch size and where its family keeps the bias tables."""
    state = Positions()
    shared = resolve(root, spec.shared_bias)
    for i, layer in enumerate(layers):
        # __dict__: plain references, not registered submodules (state-dict keys stay those of transformers)
        layer.__dict__.update(evit_positions=state, evit_layer_index=i, evit_shared_bias=shared,
                              evit_layer_bias=resolve(layer, spec.layer_bias),
                              evit_patch_size=patch)


def uninstall(layer: nn.Module) -> None:
    for attr in _ATTRS:
        layer.__dict__.pop(attr, None)


def _window(layer: nn.Module, resolution) -> tuple[int, int]:
    height, width = resolution
    return int(height) // layer.evit_patch_size, int(width) // layer.evit_patch_size


def _full_bias(layer: nn.Module, window, n0: int, interpolate: bool) -> Tensor | None:
    """The layer's (1, H, N0, N0) bias for the full sequence, as the original layer and model compute it."""
    parts = [m(window, interpolate, dim_size=n0) for m in (layer.evit_shared_bias, layer.evit_layer_bias) if m is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def bias_for(layer: nn.Module, x: Tensor, kwargs: dict) -> Tensor | None:
    """This layer's bias for the tokens of ``x`` (B, H, N, N); pops the BEiT layer keywords from ``kwargs``."""
    window = _window(layer, kwargs.pop("resolution"))
    interpolate = bool(kwargs.pop("interpolate_pos_encoding", False))
    n0 = window[0] * window[1] + 1  # class token + patches
    state = layer.evit_positions
    if layer.evit_layer_index == 0:
        state.pos = None
    state.n0 = n0
    bias = _full_bias(layer, window, n0, interpolate)
    pos = state.pos
    if bias is None or pos is None:
        return bias
    b, n = pos.shape
    padded = F.pad(bias, (0, 1, 0, 1)).expand(b, -1, -1, -1)  # index n0: the position-less fused token
    heads = padded.shape[1]
    rows = padded.gather(2, pos[:, None, :, None].expand(b, heads, n, n0 + 1))
    return rows.gather(3, pos[:, None, None, :].expand(b, heads, n, n))


def follow(layer: nn.Module, kept: Tensor | None, num_prefix: int, fused: bool, batch: int, device) -> None:
    """Record the original positions of the tokens the EViT layer left: ``[prefix, kept, fused]``."""
    if kept is None:
        return
    state = layer.evit_positions
    pos = state.pos
    if pos is None:
        pos = torch.arange(state.n0, device=device).expand(batch, -1)
    parts = [pos[:, :num_prefix], pos[:, num_prefix:].gather(1, kept)]
    if fused:
        parts.append(torch.full((batch, 1), state.n0, dtype=pos.dtype, device=device))
    state.pos = torch.cat(parts, dim=1)
