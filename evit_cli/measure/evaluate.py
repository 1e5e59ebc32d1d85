"""Evaluating models side by side on the same images: fidelity to the dense model, and accuracy with labels."""

from __future__ import annotations

import torch
from torch import nn

from .. import adapters
from ..algorithm.state import model_state
from ..errors import EvitError
from ..io.data import BadImages, load_image_data, make_loader, transforms, with_transform
from ..model.classes import eval_class_map
from .fidelity import Tally, outputs


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], data, *, reference: str = "dense", batch_size: int = 64,
                    workers: int = 2, limit: int | None = None, device="cpu", progress=None,
                    bad_images: BadImages | None = None) -> dict[str, dict]:
    """Each model on the same images, against ``models[reference]`` (the dense model): agreement (%)
    and KL(dense || model) per image, top-1/top-5 (%) when the data set has labels; for a headless
    (embedding) model, the embeddings' cosine similarity and neighbour overlap, and kNN top-1 (%)
    with labels (see :mod:`.fidelity`). A flat folder of images has no labels. Images that cannot be
    decoded stop the run, or are skipped and counted when ``bad_images`` skips."""

    ref_model = models[reference]
    adapter = adapters.get_adapter(ref_model)
    embedding = adapter.num_classes(ref_model) == 0
    mapping = eval_class_map(data.class_names, ref_model) if data.labelled and not embedding else None
    ds = data.val
    if limit:
        ds = ds.shuffle(seed=0).select(range(min(limit, len(ds))))  # a seeded sample across classes
    ds = with_transform(ds, data.image_column, data.label_column,
                        transforms(adapter.data_config(ref_model), train=False),
                        label_map=mapping, bad=bad_images)
    tallies = {name: Tally(embedding) for name in models}
    for images, target in make_loader(ds, batch_size=batch_size, workers=workers):
        images, target = images.to(device), target.to(device)
        ref = outputs(ref_model, images)
        for name, m in models.items():
            out = ref if name == reference else outputs(m, images)
            tallies[name].add(out, None if name == reference else ref, target)
        if progress:
            progress(target.numel())
    if tallies[reference].sums["images"] == 0:
        raise EvitError("the evaluation split is empty")
    return {name: t.result() for name, t in tallies.items()}


def eval_report(accuracy: dict[str, dict], speed: dict, *, dataset: str, labelled: bool,
                training: dict | None = None, reference: str | None = None) -> dict:
    """One report of `evit eval`: the accuracy of the dense and EViT models (from
    :func:`evaluate_models`) beside their GMACs and throughput (from :func:`evit_cli.measure.bench.bench`)."""

    def model_row(acc_key: str, speed_key: str) -> dict:
        s = speed[speed_key]
        return {**accuracy[acc_key], "gmacs": s["gmacs"], "images_per_s": s["images_per_s"]}

    return {
        "model": speed["model"], "dataset": dataset, "images": accuracy["evit"]["images"], "evit": speed["evit"],
        "labelled": labelled, "training": training, "reference": reference,
        "dense": model_row("dense", "dense"), "evit_model": model_row("evit", "evit_model"),
        "speedup": speed["speedup"], "batch": speed["batch"], "device_name": speed["device_name"],
    }


def load_eval_data(dataset: str, split: str | None = None, image_column: str | None = None,
                   label_column: str | None = None):
    """The images to evaluate on: ``split`` of ``dataset`` (default: its validation split, else all of it)."""
    return load_image_data(dataset, val_split=split, image_column=image_column, label_column=label_column,
                           whole_if_no_val=True)


def origin_of(record: dict | None) -> dict | None:
    """The dense model a fine-tuned model started from (``{"model", "checkpoint", "pretrained"}``):
    the first ``from`` along its chain of training records; None for a model never fine-tuned."""
    while record and record.get("previous"):
        record = record["previous"]
    return record.get("from") if record else None


def reference_model(model: nn.Module, given: str | None) -> tuple[nn.Module, str]:
    """The dense model ``model`` is compared with, and a line saying which: ``given`` (--reference),
    else the dense model a fine-tuned model started from (its own dense copy drifted with it), else
    its own dense copy (EViT off, the same weights)."""
    from ..io.loading import load_model
    from ..model.convert import dense_copy

    origin = origin_of(model_state(model).training)
    if given is not None:
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
