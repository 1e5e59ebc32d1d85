"""The dense model an EViT model is compared with: given, the dense model it was fine-tuned from,
or its own weights with EViT off."""

from __future__ import annotations

from torch import nn

from .. import adapters
from ..algorithm.state import model_state
from ..errors import EvitError


def origin_of(record: dict | None) -> dict | None:
    """The dense model a fine-tuned model started from (``{"model", "checkpoint", "pretrained"}``):
    the first ``from`` along its chain of training records; None for a model never fine-tuned."""
    while record and record.get("previous"):
        record = record["previous"]
    return record.get("from") if record else None


def reference_model(model: nn.Module, given: str | nn.Module | None) -> tuple[nn.Module, str]:
    """The dense model ``model`` is compared with, and a line saying which: ``given`` (--reference:
    a name, hub id or folder, or a model), else the dense model a fine-tuned model started from (its
    own dense copy drifted with it), else its own dense copy (EViT off, the same weights)."""
    from ..io.loading import load_model
    from ..model.convert import dense_copy

    origin = origin_of(model_state(model).training)
    if isinstance(given, nn.Module):
        ref, says = dense_copy(given), "reference: the model given (with EViT off)"
    elif given is not None:
        ref, says = dense_copy(load_model(given, pretrained=True)), f"reference: {given} (--reference)"
    elif origin is None:
        return dense_copy(model), "reference: the model's own weights with EViT off"
    elif origin.get("pretrained") is False:
        return dense_copy(model), ("reference: the model's own weights with EViT off (the model it was fine-tuned "
                                   f"from, {origin['model']}, had random weights; give --reference MODEL)")
    else:
        ref = dense_copy(_load_origin(origin, load_model))
        says = f"reference: {origin['model']}, the dense model it was fine-tuned from (--reference to change)"
    _fit_reference(model, ref, says)
    return ref, says


def _load_origin(origin: dict, load_model) -> nn.Module:
    try:
        return load_model(origin["model"], pretrained=True, checkpoint=origin.get("checkpoint"))
    except EvitError as e:
        raise EvitError(f"the dense model this model was fine-tuned from ({origin['model']}) cannot be loaded ({e}): "
                        "give --reference MODEL") from None


def _fit_reference(model: nn.Module, ref: nn.Module, says: str) -> None:
    """The reference at the model's image size; its output must be comparable (the same classes, or
    both embeddings of one width)."""
    a, r = adapters.get_adapter(model), adapters.get_adapter(ref)
    if r.img_size(ref) != a.img_size(model):
        r.set_img_size(ref, a.img_size(model))
    if a.num_classes(model) != r.num_classes(ref):
        raise EvitError(f"{says.removeprefix('reference: ')} predicts {r.num_classes(ref)} classes and the model "
                        f"{a.num_classes(model)}: give --reference a model with the same classes")
