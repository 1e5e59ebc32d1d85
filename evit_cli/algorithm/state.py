"""The one state object of a model evit has built, loaded or converted: :class:`ModelState`.

It is attached once, as ``model.evit_state``, and read through :func:`model_state`; nothing
else in the package reads or writes attributes of a model that evit adds. It holds what evit
knows about the model beyond its weights: the EViT settings it runs with, where it came from,
how it was fine-tuned, its class names and preprocessing, the adapter that serves it, and the
per-forward position bookkeeping of a timm model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from .config import EViTConfig

ATTRIBUTE = "evit_state"


@dataclass
class ModelState:
    config: EViTConfig | None = None  # the EViT settings; None: a dense model
    source: dict | None = None  # what it was built from (evit.json's "source"); None: a module given by hand
    training: dict | None = None  # how it was fine-tuned (evit.json's "training"); None: not
    class_names: list[str] | None = None  # the head's class names, where the model's own config has none
    preprocessor: dict | None = None  # a transformers model's preprocessor_config.json
    adapter: Any = None  # the adapter of the model's library, found once (shared by copies)
    positions: Any = None  # a timm model's per-forward PositionState, while EViT is applied

    def __deepcopy__(self, memo: dict) -> ModelState:
        """A copy for a copied model: everything copied but the adapter, which is one object per library."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return ModelState(**{k: v if k == "adapter" else copy.deepcopy(v, memo) for k, v in values.items()})


def model_state(model) -> ModelState:
    """``model``'s state, attached (empty) on first use."""
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        state = ModelState()
        model.__dict__[ATTRIBUTE] = state
    return state
