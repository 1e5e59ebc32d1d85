"""How a data set's classes map onto a model's classes, and what a fine-tune does with the head.

A data set's class ``i`` maps onto model class ``mapping[i]`` when its name is one of the
model's class names (``id2label``, or the names an exported folder recorded), when the names
are ImageNet synsets (``n01440764``, ...) and the model has 1000 classes, or, for a model
without class names, when the counts agree.
"""

from __future__ import annotations

from torch import nn

from .. import adapters
from ..errors import EvitError

HEAD_MODES = ("auto", "keep", "new")


def imagenet_synsets() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def class_map(data_names: list[str], model: nn.Module) -> list[int] | None:
    """Data set class -> model class index, or None when the classes do not map."""
    adapter = adapters.get_adapter(model)
    count = adapter.num_classes(model)
    if count == 0 or not data_names:
        return None
    names = adapter.class_names(model)
    if names:
        index = {str(n).lower(): i for i, n in enumerate(names)}
        if all(c.lower() in index for c in data_names):
            return [index[c.lower()] for c in data_names]
    if count == 1000:
        index = {n: i for i, n in enumerate(imagenet_synsets())}
        if all(c in index for c in data_names):
            return [index[c] for c in data_names]
    if not names and count == len(data_names):
        return list(range(count))
    return None


def eval_class_map(data_names: list[str], model: nn.Module) -> list[int] | None:
    """:func:`class_map` for evaluation: None for the identity, an error when the classes do not map."""
    mapping = class_map(data_names, model)
    count = adapters.get_adapter(model).num_classes(model)
    if mapping is None:
        raise EvitError(
            f"the data set has {len(data_names)} classes and the model {count}: evaluate on the classes the "
            "model was trained on (ImageNet synset folder names map to a 1000-class model), or drop the "
            "labels (a flat folder of images) for agreement with the dense model only"
        )
    return None if mapping == list(range(count)) else mapping


def choose_head(mode: str, data_names: list[str], model: nn.Module) -> tuple[str, list[int] | None]:
    """``("keep", mapping)``, ``("new", None)`` or ``("none", None)`` for ``--head auto|keep|new``.

    ``auto`` keeps the head when the data set's classes map onto the model's (or the data set has
    no labels), and replaces it otherwise. A headless (embedding) model stays headless under
    ``auto`` and ``keep`` ("none": its embedding is distilled, the labels only score kNN top-1);
    ``new`` gives it a classifier.
    """
    if mode not in HEAD_MODES:
        raise EvitError(f"--head must be one of {', '.join(HEAD_MODES)}, got {mode!r}")
    count = adapters.get_adapter(model).num_classes(model)
    if not data_names:  # no labels: the model's own output (its head, or its embedding) is distilled
        if mode == "new":
            raise EvitError("--head new needs labels, and the data set has none: drop --head new to keep the model's "
                            "head")
        return "keep", None
    if count == 0 and mode != "new":
        return "none", None
    mapping = class_map(data_names, model)
    if mode == "new" or (mode == "auto" and mapping is None):
        return "new", None
    if mapping is None:
        raise EvitError(
            f"--head keep: the data set's {len(data_names)} classes ({', '.join(data_names[:3])}, ...) are not "
            f"among the model's {count} classes: use --head new (or auto)"
        )
    return "keep", mapping
