"""One adapter per model family; the only code that knows a model's internals.

An adapter module provides ``matches(model)``, ``check(model)``, ``depth``,
``num_prefix_tokens``, ``num_tokens`` (entering block 1), ``img_size``,
``data_config`` (timm-style preprocessing), ``class_names``,
``apply(model, cfg)`` and ``remove(model)``. The EViT blocks it installs carry
``evit_keep_rate``, ``evit_record`` and ``evit_kept``, which the generic
helpers below use.
"""

from __future__ import annotations

from torch import nn

from ..errors import EvitError
from . import timm as timm_adapter
from . import transformers as transformers_adapter

ADAPTERS = [timm_adapter, transformers_adapter]


def get_adapter(model: nn.Module):
    """The adapter of ``model``'s library; an ``EvitError`` saying why when it cannot serve the model."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            adapter.check(model)
            return adapter
    raise EvitError(
        f"{type(model).__name__} is not a supported Vision Transformer: EViT needs a ViT with a class "
        "token (timm VisionTransformer, Eva or Beit, or transformers ViT/DeiT)"
    )


def _all_evit_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "evit_keep_rate")]


def evit_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's EViT blocks, one per EViT layer, in depth order: those of the reported token
    sequence (``evit_sequence`` 0; a CrossViT has one more per layer in its other branch)."""
    return [m for m in _all_evit_blocks(model) if not getattr(m, "evit_sequence", 0)]


def num_sequences(model: nn.Module) -> int:
    """How many token sequences the model runs side by side (2 for a CrossViT's branches, else 1)."""
    adapter = get_adapter(model)
    return len(adapter.sequences(model)) if hasattr(adapter, "sequences") else 1


def set_keep_rates(model: nn.Module, rates) -> None:
    """Change the keep rate of every EViT layer (e.g. from a training schedule); one rate, or one per layer."""
    layers = evit_blocks(model)
    rates = list(rates) if hasattr(rates, "__iter__") else [rates] * len(layers)
    if len(rates) != len(layers):
        raise ValueError(f"{len(rates)} keep rates for {len(layers)} EViT blocks")
    per_sequence: dict[int, list[nn.Module]] = {}
    for blk in _all_evit_blocks(model):
        per_sequence.setdefault(getattr(blk, "evit_sequence", 0), []).append(blk)
    for blocks in per_sequence.values():  # each sequence has one block per layer, in depth order
        for blk, rate in zip(blocks, rates, strict=True):
            blk.evit_keep_rate = float(rate)


def record_kept(model: nn.Module, enabled: bool = True) -> None:
    """Make each EViT block keep the indices of its attentive tokens (``evit_kept``)."""
    for blk in _all_evit_blocks(model):
        blk.evit_record = enabled
        blk.evit_kept = None
