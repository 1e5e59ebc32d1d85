"""The modeling code of a folder in transformers' TimmWrapper layout: ``EvitTimmWrapperModel`` and
``EvitTimmWrapperForImageClassification``, which apply EViT to their ``timm_model`` once built
(see :mod:`.remote`; this one needs timm, as TimmWrapper itself does)."""

from __future__ import annotations

from ..adapters.timm.wrapper import TIMM_WRAPPER
from .remote import class_getter

__getattr__ = class_getter(TIMM_WRAPPER, __name__)
