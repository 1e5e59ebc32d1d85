"""Counting multiply-accumulates, and the keep rate that meets a MAC budget."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import adapters
from ..errors import EvitError
from .convert import convert_module, dense_copy, get_config


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one SDPA call: QK^T and AV, 2 FLOPs per MAC."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _attention_mapping() -> dict:
    """Count the fused-attention kernels the installed FlopCounterMode leaves out (it looks ops up by packet)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        op = getattr(aten, name, None)
        if op is not None and op.default not in flop_registry and op not in flop_registry:
            mapping[op] = lambda q, k, v, *a, out_shape=None, **kw: _sdpa_flop(q, k, v)
    return mapping


def count_macs(model: nn.Module, img_size: int, device: str | torch.device = "cpu") -> int:
    """Multiply-accumulates of one forward pass on one image (FLOPs / 2), attention included."""
    x = torch.randn(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_attention_mapping())
    # parameters frozen meanwhile: the counter's module tracker cannot hook a view of a trainable parameter made
    # under no_grad (an attention-pool probe's ``latent.expand``)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with counter, torch.no_grad():
            adapters.get_adapter(model).run(model, x)  # an image-text model: its image tower
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() // 2


def macs_at(model: nn.Module, keep_rate: float) -> int:
    """Counted MACs of ``model`` with every EViT layer at ``keep_rate``."""
    cfg = get_config(model)
    adapters.set_keep_rates(model, [keep_rate] * len(cfg.layers))
    try:
        return count_macs(model, adapters.get_adapter(model).img_size(model), next(model.parameters()).device)
    finally:
        adapters.set_keep_rates(model, cfg.keep_rates)


def largest_keep_rate_under(model: nn.Module, budget: float, step: float = 0.001) -> float:
    """The largest keep rate (multiple of ``step``) whose counted MACs stay within ``budget``.

    MACs never grow as the keep rate falls, so a bisection finds it.
    """
    lo, hi = 1, round(1 / step)  # in units of step
    if macs_at(model, hi * step) <= budget:
        return 1.0
    if macs_at(model, lo * step) > budget:
        raise EvitError(f"no keep rate meets {budget / 1e9:.3f} GMACs at these layers: choose earlier layers or a "
                        f"larger target")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if macs_at(model, mid * step) <= budget:
            lo = mid
        else:
            hi = mid
    return round(lo * step, 6)


def match_macs(model: nn.Module, reference_size: int, layers, fuse: bool = True, method: str = "evit",
               score: str | None = None, restore=None) -> float:
    """Convert ``model`` (already at its new image size) with the keep rate whose counted MACs come
    closest to the dense model at ``reference_size`` px without exceeding them; returns the rate."""
    adapter = adapters.get_adapter(model)
    ref = dense_copy(model)
    adapter.set_img_size(ref, reference_size)
    budget = count_macs(ref, reference_size)
    convert_module(model, keep_rate=1.0, layers=layers, fuse=fuse, method=method, score=score, restore=restore)
    rate = largest_keep_rate_under(model, budget)
    convert_module(model, keep_rate=rate, layers=layers, fuse=fuse, method=method, score=score, restore=restore)
    return rate
