"""The adapter interface: every member the rest of the package uses on an adapter.

An adapter is the only code that knows a library's model internals. Each
library has one adapter instance (``adapters.ADAPTERS``); :func:`~.get_adapter`
picks it by :meth:`Adapter.matches`, which is cheap; :meth:`Adapter.check`,
the full support check, runs once, where a model is converted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import nn

from ..algorithm.config import EViTConfig


class Sequence(NamedTuple):
    """One token sequence of a model: its length entering the first block, and its prefix tokens."""

    num_tokens: int
    num_prefix: int


class Adapter(ABC):
    """One library's models, as the package sees them."""

    name: str  # the library, as recorded in an exported folder ("timm", "transformers")

    # ------------------------------------------------------------ recognizing and converting

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this adapter's library (cheap: no support check)."""

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise an ``EvitError`` saying, in one line, why EViT cannot convert ``model``."""

    @abstractmethod
    def apply(self, model: nn.Module, cfg: EViTConfig) -> None:
        """Install EViT as ``cfg`` says (in place; a previous conversion is removed first)."""

    @abstractmethod
    def remove(self, model: nn.Module) -> None:
        """Undo :meth:`apply`: the library's own classes and nothing EViT left."""

    def scores(self, model: nn.Module) -> tuple[str, ...]:
        """The token scores (``config.SCORES``) that can rank ``model``'s tokens, its default first."""
        return ("cls",)

    def restores(self, model: nn.Module) -> bool:
        """Whether a forward of ``model`` can put the removed patches back (a dense head or backbone, timm's NCHW
        intermediates): what a restore setting (``algorithm/restore.py``) applies to."""
        return False

    # ------------------------------------------------------------ shape of the token sequence

    def depth(self, model: nn.Module) -> int:
        """Number of layers a user can choose EViT layers from."""
        return len(self.layers(model))

    @abstractmethod
    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The model's layers, in order (those of its reported token sequence): what EViT layers are
        chosen among. Each returns the token sequence (B, N, D) first (alone or in a tuple)."""

    def sequences(self, model: nn.Module) -> list[Sequence]:
        """Every token sequence the model runs side by side, the reported one first."""
        return [Sequence(self.num_tokens(model), self.num_prefix_tokens(model))]

    @abstractmethod
    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Class (+ distillation, register) tokens before the patches."""

    @abstractmethod
    def num_tokens(self, model: nn.Module) -> int:
        """Sequence length entering the first block (of the reported sequence)."""

    @abstractmethod
    def img_size(self, model: nn.Module) -> int:
        """The image side (px) the model runs at."""

    @abstractmethod
    def set_img_size(self, model: nn.Module, size: int) -> None:
        """Run at ``size`` px from now on, position terms resampled."""

    @abstractmethod
    def data_config(self, model: nn.Module) -> dict:
        """timm-style preprocessing of the model's images."""

    # ------------------------------------------------------------ classes and head

    @abstractmethod
    def num_classes(self, model: nn.Module) -> int:
        """Classes of its head; 0 for a headless (embedding) model."""

    @abstractmethod
    def class_names(self, model: nn.Module) -> list[str] | None:
        """Its classes' names, when it has them."""

    @abstractmethod
    def set_class_names(self, model: nn.Module, class_names: list[str]) -> None: ...

    def head(self, model: nn.Module) -> nn.Module | None:
        """The classification head, whose input is the pre-logits feature (None when headless)."""
        return None

    @abstractmethod
    def reset_head(self, model: nn.Module, num_classes: int, class_names: list[str]) -> None:
        """A new, freshly initialized classification head."""

    # ------------------------------------------------------------ the model's output

    def run(self, model: nn.Module, images: torch.Tensor):
        """The model's forward on a batch of images, as the library returns it."""
        return model(images)

    @abstractmethod
    def output(self, model: nn.Module, raw) -> torch.Tensor:
        """The model's output as its users take it, from what :meth:`run` (or the model) returned:
        a classifier's logits, an embedding model's embedding."""

    def outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """:meth:`output` of the model on ``images``."""
        return self.output(model, self.run(model, images))
