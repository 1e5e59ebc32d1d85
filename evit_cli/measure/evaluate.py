"""The one evaluator: models side by side on the same images, their fidelity to a reference model
and their accuracy with labels, as typed rows (:class:`~.metrics.FidelityRow`).

Its pieces are built once per model and data set, and `evit eval`, `evit sweep` and `evit search` go
through them (and :func:`validate`, for a fine-tune's validation): the eval transform (:func:`eval_transform`, the
model's own preprocessing), the label map (:func:`eval_label_map`, the data set's classes onto the
model's), the seeded sample (:meth:`Evaluator.dataset`), the outputs (:func:`.fidelity.outputs`)
and the tally of the measures (:func:`tally_batches`, :class:`.fidelity.Tally`).

    rows = Evaluator(dense, data).run({"dense": dense, "evit": model}, limit=500)
    rows["evit"].agreement, rows["evit"].top1

:func:`validate` is one model against its reference (or teacher) on a DataLoader; :func:`evaluate`
is the one-call report of `evit eval` (``evit_cli.evaluate``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from .. import adapters
from ..algorithm.state import model_state
from ..errors import EvitError
from ..io.datasets import ImageData, load_image_data, sample_size
from ..io.images import BadImages, make_loader, transforms, with_transform
from ..model.classes import eval_class_map
from ..model.convert import dense_copy, get_config
from ..model.macs import count_macs
from ..model.validate import non_negative_int, optional, positive_int
from ..utils.device import autocast, describe_device, resolve_device
from ..utils.progress import Progress
from .bench import bench as run_bench
from .fidelity import Tally, outputs
from .metrics import FidelityRow
from .reference import reference_model


def is_embedding(model: nn.Module) -> bool:
    """A headless model: its output is an embedding, not class logits."""
    return adapters.get_adapter(model).num_classes(model) == 0


def eval_transform(model: nn.Module):
    """The model's evaluation preprocessing (resize, centre crop, its mean and std)."""
    return transforms(adapters.get_adapter(model).data_config(model), train=False)


def eval_label_map(model: nn.Module, data) -> list[int] | None:
    """The model's class of each of the data set's classes (e.g. ImageNet synset folders onto a
    1000-class model); None without labels, for a headless model (its kNN uses the data set's own
    classes), or when they are the same."""
    return eval_class_map(data.class_names, model) if data.labelled and not is_embedding(model) else None


def _check_classes(data) -> None:
    """Top-1 over labels of a single class says nothing (a model that always answers it scores 100%)."""
    column, split = data.label_column, data.val
    if column is None or not hasattr(split, "unique") or not hasattr(split, "__len__"):
        return  # no labels, or a stream: not read ahead
    values = [v for v in split.unique(column) if v != -1]
    if len(values) == 1:
        name = data.class_names[values[0]] if 0 <= values[0] < len(data.class_names) else values[0]
        raise EvitError(f"the evaluation split ({data.val_source}) holds a single class ({name!r}): top-1 over one "
                        "class says nothing; give images of two or more classes, or drop the labels (a flat folder "
                        "of images) to measure agreement with the dense model")


class Evaluator:
    """The pieces of an evaluation of models like ``model`` (same preprocessing and classes; its
    dense copy and EViT variants) on ``data`` (an :class:`evit_cli.io.datasets.ImageData`; its
    validation split is evaluated), built once. Images that cannot be decoded stop the run, or are
    skipped and counted when ``bad_images`` skips."""

    def __init__(self, model: nn.Module, data, *, bad_images: BadImages | None = None):
        self.data, self.bad_images = data, bad_images
        self.embedding = is_embedding(model)
        self.transform = eval_transform(model)
        _check_classes(data)
        self.label_map = eval_label_map(model, data)

    def size(self, limit: int | None = None) -> int | None:
        """How many images an evaluation with ``limit`` reads (None: a stream of unknown length)."""
        return sample_size(self.data.val, limit)

    def dataset(self, limit: int | None = None):
        """The split, transformed, with labels in the model's classes; with ``limit``, a seeded
        sample of that many images across the classes."""
        ds = self.data.val
        if limit:
            ds = ds.shuffle(seed=0).select(range(min(limit, len(ds))))
        return with_transform(ds, self.data.image_column, self.data.label_column, self.transform,
                              label_map=self.label_map, bad=self.bad_images)

    def batches(self, *, batch_size: int = 64, workers: int = 2, limit: int | None = None):
        """(images, target) batches of :meth:`dataset` (target -1: no label)."""
        return make_loader(self.dataset(limit), batch_size=batch_size, workers=workers)

    def run(self, models: dict[str, nn.Module], *, reference: str = "dense", batch_size: int = 64, workers: int = 2,
            limit: int | None = None, device="cpu", amp: bool = False, progress=None) -> dict[str, FidelityRow]:
        """Each model (in eval mode) on the same images, against ``models[reference]``: a row per model
        (the reference's own row has its accuracy only). ``progress(n)`` is called after each batch."""
        fns = {name: _outputs_of(m.eval()) for name, m in models.items()}
        tallies = tally_batches(fns, self.batches(batch_size=batch_size, workers=workers, limit=limit),
                                reference=reference, embedding=self.embedding, device=device, amp=amp,
                                progress=progress)
        if tallies[reference].sums["images"] == 0:
            if self.bad_images is not None and self.bad_images.count:
                raise EvitError(f"none of the {self.bad_images.count} images could be decoded (all were skipped): "
                                "check the data set, or give another")
            raise EvitError("the evaluation split is empty: give another --split or data set")
        return {name: FidelityRow.from_dict(name, t.result()) for name, t in tallies.items()}


def _outputs_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: outputs(model, images)


@torch.no_grad()
def tally_batches(outputs_of: dict[str, Callable[[torch.Tensor], torch.Tensor]], batches, *,
                  reference: str | None, embedding: bool, device="cpu", amp: bool = False, progress=None,
                  tallied: tuple[str, ...] | None = None) -> dict[str, Tally]:
    """The measures of each function in ``outputs_of`` (images -> logits or embeddings) over
    ``batches`` of (images, target), against the outputs of ``outputs_of[reference]`` (None: no
    reference, labels only); a :class:`~.fidelity.Tally` per name in ``tallied`` (default: all).
    Summed over the processes of a torch.distributed run."""
    dev = torch.device(device)
    tallies = {name: Tally(embedding) for name in (tallied or tuple(outputs_of))}
    for images, target in batches:
        images, target = images.to(dev), target.to(dev)
        with autocast(dev, amp):
            outs = {name: f(images).float() for name, f in outputs_of.items()}
        ref = outs[reference] if reference is not None else None
        for name, tally in tallies.items():
            tally.add(outs[name], None if name == reference else ref, target)
        if progress:
            progress(target.numel())
    for tally in tallies.values():
        tally.all_reduce(dev)
    return tallies


_REFERENCE = "\0reference"  # validate()'s name for the reference's outputs, never a caller's


def _reference_outputs(reference) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if isinstance(reference, nn.Module):
        return _outputs_of(reference.eval())
    if reference is not None and hasattr(reference, "outputs"):  # a distillation teacher
        return reference.outputs
    return reference


def _batches_of(data, batch_size: int, workers: int, sampler):
    if isinstance(data, (torch.utils.data.DataLoader, list, tuple, Iterator)):
        return data
    return make_loader(data, batch_size=batch_size, workers=workers, sampler=sampler)


def validate(model: nn.Module, reference, data, device, *, batch_size: int = 64, workers: int = 2, sampler=None,
             amp: bool = False, forward: Callable | None = None, name: str = "model") -> FidelityRow:
    """``model`` against its ``reference`` on ``data``: the fine-tune's validation (and any one model's).

    ``reference``: the dense model (an ``nn.Module``, read through its adapter), a distillation
    teacher (anything with ``outputs(images)``: logits over the model's classes, or an embedding),
    a function of the images, or None (accuracy with labels only). ``data``: a DataLoader (or any
    iterable of (images, target) batches, target -1 for no label), or a data set transformed with
    :func:`eval_transform` and the labels in the model's classes, read in ``batch_size`` batches by
    ``workers`` with ``sampler``. ``forward``: what runs the model (e.g. its DistributedDataParallel
    wrapper; default the model), its output read through the model's adapter. Under
    ``torch.distributed`` the measures are over every process's images. ``row.images == 0``: no
    image was read (the caller says why)."""
    if forward is None:
        fns = {name: _outputs_of(model.eval())}
    else:
        if isinstance(forward, nn.Module):
            forward.eval()
        adapter = adapters.get_adapter(model)
        fns = {name: lambda images: adapter.output(model, adapter.run(forward, images))}
    ref = _reference_outputs(reference)
    if ref is not None:
        fns[_REFERENCE] = ref
    tallies = tally_batches(fns, _batches_of(data, batch_size, workers, sampler),
                            reference=_REFERENCE if ref is not None else None, embedding=is_embedding(model),
                            device=device, amp=amp, tallied=(name,))
    return FidelityRow.from_dict(name, tallies[name].result())


def load_eval_data(dataset: str, split: str | None = None, image_column: str | None = None,
                   label_column: str | None = None):
    """The images to evaluate on: ``split`` of ``dataset`` (default: its validation split, else all of it)."""
    return load_image_data(dataset, val_split=split, image_column=image_column, label_column=label_column,
                           whole_if_no_val=True)


# --------------------------------------------------------------------------- the one-call report of `evit eval`


@contextmanager
def progress_of(progress):
    """A :class:`~evit_cli.utils.progress.Progress` to show work on: ``progress`` itself when it is
    one (already shown by its caller), else a new one, shown when ``progress`` is true."""
    if isinstance(progress, Progress):
        yield progress
    else:
        with Progress(enabled=bool(progress)) as p:
            yield p


def evit_model(model: nn.Module | str | os.PathLike) -> nn.Module:
    """``model`` when it is an EViT model; a name or folder loaded with its own EViT settings (or
    the defaults: :func:`evit_cli.io.loading.load_converted`); a model without EViT refused."""
    from ..io.loading import load_converted

    m = model if isinstance(model, nn.Module) else load_converted(model)
    if get_config(m) is None:
        raise EvitError("this model has no EViT layers: convert it first (evit convert / evit_cli.convert)")
    return m


@dataclass
class EvalResult:
    """What `evit eval` reports: the dense reference and the EViT model measured on the same images,
    with their counted GMACs and, when timed, their images/s. :meth:`to_dict` is the JSON report."""

    model: str
    dataset: str
    labelled: bool
    reference: str  # which dense model the EViT model was compared with, in words
    dense: FidelityRow
    evit_model: FidelityRow
    speed: dict  # evit_cli.bench's report, or counted GMACs only (images_per_s and speedup None)
    training: dict | None = None  # how the model was fine-tuned (its training record)
    skipped_images: int | None = None  # images that could not be decoded, when they were skipped

    @property
    def images(self) -> int:
        return self.evit_model.images

    @property
    def speedup(self) -> float | None:
        return self.speed.get("speedup")

    def to_dict(self) -> dict:
        r = eval_report({"dense": self.dense, "evit": self.evit_model}, self.speed, dataset=self.dataset,
                        labelled=self.labelled, training=self.training, reference=self.reference)
        if self.skipped_images is not None:
            r["skipped_images"] = self.skipped_images
        return r


def evaluate(model: nn.Module | str | os.PathLike, dataset, *, reference: nn.Module | str | None = None,
             split: str | None = None, limit: int | None = None, batch: int = 64, workers: int = 2,
             device: str = "cpu", bench: bool = True, reps: int = 5, image_column: str | None = None,
             label_column: str | None = None, skip_bad_images: bool = False, progress=False) -> EvalResult:
    """An EViT model against its dense reference on the same images, in one call (`evit eval`).

    ``model``: an EViT model, or an exported folder (anything `evit eval` takes). ``dataset``: a hub
    name, image folder, save_to_disk folder or parquet (``split``, else its validation split, else
    all of it), or data from :func:`load_eval_data`. ``reference``: the dense model (a name, hub id,
    folder or model); default: for a fine-tuned model the dense model it started from, else the
    model's own weights with EViT off. ``limit``: a seeded sample of that many images. ``bench``:
    also time both models (images/s, speedup: :func:`evit_cli.bench` at ``batch`` with ``reps``);
    without it, their counted GMACs only. ``skip_bad_images``: skip and count undecodable images.
    ``progress``: show progress on stderr (or on a given Progress).

        result = evit_cli.evaluate("deit_s_evit", "imagenette-val", limit=500)
        result.evit_model.agreement, result.to_dict()
    """
    positive_int("--batch", batch)
    optional(positive_int)("--limit", limit)
    non_negative_int("--workers", workers)
    dev = resolve_device(device)
    m = evit_model(model).to(dev)
    ref, says = reference_model(m, reference)
    bad = BadImages(skip_bad_images)
    data = dataset if isinstance(dataset, ImageData) else load_eval_data(str(dataset), split, image_column,
                                                                         label_column)
    ev = Evaluator(ref, data, bad_images=bad)
    with progress_of(progress) as p, p.task("eval dense and EViT", ev.size(limit), unit="images") as advance:
        rows = ev.run({"dense": ref.to(dev), "evit": m}, batch_size=batch, workers=workers, limit=limit, device=dev,
                      progress=advance)
    speed = (run_bench(m, batch=batch, device=device, reps=reps, warmup=1, progress=bool(progress)) if bench
             else counted_speed(m, batch=batch, device=dev))
    dense, evit = (replace(rows[k], gmacs=speed[s]["gmacs"], images_per_s=speed[s]["images_per_s"])
                   for k, s in (("dense", "dense"), ("evit", "evit_model")))
    return EvalResult(speed["model"], data.val_source if isinstance(dataset, ImageData) else str(dataset),
                      data.labelled, says, dense, evit, speed, model_state(m).training,
                      bad.count if skip_bad_images else None)


def counted_speed(model: nn.Module, *, batch: int, device) -> dict:
    """What the eval report takes from a benchmark, without timing: the model, its EViT settings and
    the counted GMACs of it and its dense copy (images/s and speedup None)."""
    dev = torch.device(device)
    img = adapters.get_adapter(model).img_size(model)
    dense = dense_copy(model)
    return {
        "model": (model_state(model).source or {}).get("model", type(model).__name__),
        "evit": get_config(model).to_dict(), "batch": batch, "device_name": describe_device(dev), "speedup": None,
        "dense": {"gmacs": count_macs(dense, img, dev) / 1e9, "images_per_s": None},
        "evit_model": {"gmacs": count_macs(model, img, dev) / 1e9, "images_per_s": None},
    }


def eval_report(accuracy: dict[str, dict | FidelityRow], speed: dict, *, dataset: str, labelled: bool,
                training: dict | None = None, reference: str | None = None) -> dict:
    """The JSON report of `evit eval`: the accuracy of the dense and EViT models (``accuracy["dense"]``
    and ``["evit"]``: rows of :class:`Evaluator`) beside their GMACs and throughput (from
    :func:`evit_cli.measure.bench.bench`, or :func:`counted_speed`)."""

    def model_row(acc_key: str, speed_key: str) -> dict:
        acc, s = accuracy[acc_key], speed[speed_key]
        acc = acc.to_dict() if isinstance(acc, FidelityRow) else acc
        return {**acc, "gmacs": s["gmacs"], "images_per_s": s["images_per_s"]}

    images = accuracy["evit"].images if isinstance(accuracy["evit"], FidelityRow) else accuracy["evit"]["images"]
    return {
        "model": speed["model"], "dataset": dataset, "images": images, "evit": speed["evit"],
        "labelled": labelled, "training": training, "reference": reference,
        "dense": model_row("dense", "dense"), "evit_model": model_row("evit", "evit_model"),
        "speedup": speed["speedup"], "batch": speed["batch"], "device_name": speed["device_name"],
    }
