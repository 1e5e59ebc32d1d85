"""Relative position bias that follows the kept tokens (BEiT, Data2Vec-vision).

The bias tables give one (H, N0, N0) bias for the full sequence of ``N0``
tokens (class token + patches). Once an EViT layer has reorganized the tokens,
every later layer sees ``[class, kept..., fused]``: its bias is the full one
gathered, per image, at the original positions of the tokens that remain
(``reorg.gather_bias``), the same positions and encoding the timm families
follow (``reorg.follow_positions``, kept in the model's shared
:class:`..block.PositionState`, which layer 0 resets at every forward).

The fused token has no position of its own: it gets **no bias** (zero), as
query and as key, in every later layer -- the same "no position term" the
fused token gets in the timm RoPE families. A fused token that a later EViT
layer keeps stays position-less.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...algorithm.reorg import gather_bias
from ..block import BlockState
from .families import Family, resolve


def tables(layer: nn.Module, spec: Family, root: nn.Module) -> tuple:
    """The (shared, per-layer) bias modules of ``layer``; either may be ``None``."""
    return resolve(root, spec.shared_bias), resolve(layer, spec.layer_bias)


def _full_bias(st: BlockState, window, n0: int, interpolate: bool) -> Tensor | None:
    """The layer's (1, H, N0, N0) bias for the full sequence, as the original layer and model compute it."""
    parts = [m(window, interpolate, dim_size=n0) for m in st.bias_tables if m is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def bias_for(layer: nn.Module, kwargs: dict) -> Tensor | None:
    """This layer's bias for its tokens (B, H, N, N); pops the BEiT layer keywords from ``kwargs``."""
    st: BlockState = layer.evit
    height, width = kwargs.pop("resolution")
    window = (int(height) // st.patch_size, int(width) // st.patch_size)
    interpolate = bool(kwargs.pop("interpolate_pos_encoding", False))
    bias = _full_bias(st, window, window[0] * window[1] + st.num_prefix, interpolate)
    pos = st.positions.pos
    if bias is None or pos is None:
        return bias
    return gather_bias(bias, pos, st.num_prefix)
