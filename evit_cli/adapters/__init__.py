"""One adapter per model library; the only code that knows a model's internals.

Every adapter implements :class:`.base.Adapter`, which declares all that the
rest of the package uses on one. The EViT blocks an adapter installs carry
their state in one :class:`.block.BlockState` (``blk.evit``), which the
generic helpers below use.
"""

from __future__ import annotations

from torch import nn

from ..algorithm.state import model_state
from ..errors import EvitError
from .base import Adapter
from .block import BlockState, state_of
from .timm import TIMM
from .timm.wrapper import TIMM_WRAPPER
from .transformers import TRANSFORMERS

ADAPTERS: tuple[Adapter, ...] = (TIMM, TIMM_WRAPPER, TRANSFORMERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s library, chosen cheaply; an ``EvitError`` when no library's.

    Whether EViT can convert the model is :meth:`Adapter.check`'s to say, once, at conversion. The
    adapter found is kept in the model's state, so that it is looked for once."""
    state = model_state(model)
    if state.adapter is not None:
        return state.adapter
    for adapter in ADAPTERS:
        if adapter.matches(model):
            state.adapter = adapter
            return adapter
    raise EvitError(
        f"{type(model).__name__} is not a supported Vision Transformer: EViT needs a ViT with a class "
        "token (timm VisionTransformer, Eva or Beit, or transformers ViT/DeiT)"
    )


def all_evit_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block that reorganizes tokens, in every token sequence, in module order."""
    return [m for m in model.modules() if (st := state_of(m)) is not None and st.reorganizes]


def evit_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's EViT blocks, one per EViT layer, in depth order: those of the reported token
    sequence (a CrossViT has one more per layer in its other branch)."""
    return [m for m in all_evit_blocks(model) if m.evit.sequence == 0]


def num_sequences(model: nn.Module) -> int:
    """How many token sequences the model runs side by side (2 for a CrossViT's branches, else 1)."""
    return len(get_adapter(model).sequences(model))


def set_keep_rates(model: nn.Module, rates) -> None:
    """Change the keep rate of every EViT layer (e.g. from a training schedule); one rate, or one per layer."""
    layers = evit_blocks(model)
    rates = list(rates) if hasattr(rates, "__iter__") else [rates] * len(layers)
    if len(rates) != len(layers):
        raise ValueError(f"{len(rates)} keep rates for {len(layers)} EViT blocks")
    per_sequence: dict[int, list[BlockState]] = {}
    for blk in all_evit_blocks(model):
        per_sequence.setdefault(blk.evit.sequence, []).append(blk.evit)
    for states in per_sequence.values():  # each sequence has one block per layer, in depth order
        for st, rate in zip(states, rates, strict=True):
            st.keep_rate = float(rate)


def record_kept(model: nn.Module, enabled: bool = True) -> None:
    """Make each EViT block keep the indices of its attentive tokens (``blk.evit.kept``)."""
    for blk in all_evit_blocks(model):
        blk.evit.record, blk.evit.kept = enabled, None
