"""EViT for transformers' ``TimmWrapperModel`` / ``TimmWrapperForImageClassification``: converted
through the timm adapter on their ``timm_model``; names, outputs and the config are transformers'.

Apart from :mod:`.transformers`, which needs no timm: a transformers model's shipped modeling code
(:mod:`..remote`) then needs no timm either.
"""

from __future__ import annotations

from torch import nn

from ...algorithm.config import EViTConfig
from ...errors import EvitError
from ..base import Sequence
from ..transformers import TransformersAdapter
from . import TIMM


class TimmWrapperAdapter(TransformersAdapter):
    """``TimmWrapperModel`` / ``TimmWrapperForImageClassification``: converted through the timm
    adapter on their ``timm_model``; names, outputs and the config are transformers'."""

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in ("TimmWrapperModel", "TimmWrapperForImageClassification")

    def check(self, model: nn.Module) -> None:
        TIMM.check(model.timm_model)

    def apply(self, model: nn.Module, cfg: EViTConfig) -> None:
        TIMM.apply(model.timm_model, cfg)

    def remove(self, model: nn.Module) -> None:
        TIMM.remove(model.timm_model)

    def scores(self, model: nn.Module) -> tuple[str, ...]:
        return TIMM.scores(model.timm_model)

    def restores(self, model: nn.Module) -> bool:
        return TIMM.restores(model.timm_model)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return TIMM.layers(model.timm_model)

    def sequences(self, model: nn.Module) -> list[Sequence]:
        return TIMM.sequences(model.timm_model)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return TIMM.num_prefix_tokens(model.timm_model)

    def num_tokens(self, model: nn.Module) -> int:
        return TIMM.num_tokens(model.timm_model)

    def img_size(self, model: nn.Module) -> int:
        return TIMM.img_size(model.timm_model)

    def data_config(self, model: nn.Module) -> dict:
        return TIMM.data_config(model.timm_model)

    def num_classes(self, model: nn.Module) -> int:
        return TIMM.num_classes(model.timm_model)

    def reset_head(self, model: nn.Module, num_classes: int, class_names: list[str]) -> None:
        raise EvitError("replacing the head of a TimmWrapper model is not supported: convert the timm model by name")

    def set_img_size(self, model: nn.Module, size: int) -> None:
        raise EvitError(f"--img-size is not supported for {type(model).__name__} yet: convert it at its own size")


TIMM_WRAPPER = TimmWrapperAdapter()
