"""Image classification data through `datasets`: hub names, image folders, saved data sets, parquet.

Map-style data sets stay memory-mapped Arrow (nothing is loaded whole);
``streaming=True`` reads a hub or parquet data set as it goes.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from ..errors import EvitError, first_line, is_out_of_memory
from .hub import go_offline_if_unreachable

VAL_SPLITS = ("validation", "valid", "val", "test")


@dataclass
class ImageData:
    train: object  # datasets.Dataset or IterableDataset
    val: object
    image_column: str
    label_column: str | None  # None: no labels (a flat folder of images, no label column)
    class_names: list[str]  # empty without labels
    val_source: str = ""  # which images the validation split is, in words

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labelled(self) -> bool:
        return self.label_column is not None


def _load(source: str, streaming: bool):
    import datasets


    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source)
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
                return ds.to_iterable_dataset() if streaming and isinstance(ds, datasets.Dataset) else ds
            parquet = sorted(path.rglob("*.parquet"))
            if parquet:
                files = _parquet_splits(path, parquet)
                return datasets.load_dataset("parquet", data_files=files, streaming=streaming)
            return datasets.load_dataset("imagefolder", data_files=_imagefolder_splits(path), streaming=streaming)
        if path.suffix == ".parquet" and path.is_file():
            return datasets.load_dataset("parquet", data_files={"train": str(path)}, streaming=streaming)
        if path.is_file():
            raise EvitError(f"data set {source} is a file, not a data set: give a folder of images (a subfolder "
                            "per class, or one flat folder), a save_to_disk folder, a .parquet file or a hub name")
        if source.startswith((".", "/", "~")):
            raise EvitError(f"data set {source} does not exist: give a folder, a parquet file or a hub name")
        if go_offline_if_unreachable():
            datasets.config.HF_HUB_OFFLINE = True
        return datasets.load_dataset(source, streaming=streaming)
    except EvitError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for one cause
        if is_out_of_memory(e) or isinstance(e, PermissionError):
            raise
        if path.exists():
            raise EvitError(f"cannot read data set {source} ({first_line(e)}): is it complete? write or copy it "
                            "again") from None
        raise EvitError(f"cannot load data set {source} ({first_line(e)}): check the name or the folder") from None


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _imagefolder_splits(root: Path) -> dict[str, list[str]]:
    """Image files by split: top-level train/validation/... folders when present, else all train.

    Listed explicitly: `datasets`' own split inference reads split names into file names
    (ILSVRC2012_val_*.JPEG) and drops files.
    """
    def images(d: Path) -> list[str]:
        return sorted(str(f) for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())

    splits = {d.name.lower(): images(d) for d in root.iterdir()
              if d.is_dir() and d.name.lower() in ("train",) + VAL_SPLITS}
    splits = {k: v for k, v in splits.items() if v} or {"train": images(root)}
    if not any(splits.values()):
        raise EvitError(f"no images under {root}: an image folder has a subfolder of images per class")
    return splits


def _parquet_splits(root: Path, files: list[Path]) -> dict[str, list[str]]:
    """Group parquet files by the split their path names (train/validation/test), else all train."""
    splits: dict[str, list[str]] = {}
    for f in files:
        rel = str(f.relative_to(root)).lower()
        split = next((s for s in ("train",) + VAL_SPLITS if s in rel), "train")
        splits.setdefault(split, []).append(str(f))
    return splits


def _find_columns(features, image_column: str | None, label_column: str | None) -> tuple[str, str | None]:
    """The image column and the label column (None when the data set has no labels)."""
    import datasets

    if features is None:
        raise EvitError("the data set does not declare its columns: give --image-column and --label-column")
    names = list(features)
    if image_column is None:
        image_column = next((n for n in names if isinstance(features[n], datasets.Image)), None)
        image_column = image_column or next((n for n in ("image", "img", "pixel_values") if n in names), None)
    if label_column is None:
        label_column = next((n for n in names if isinstance(features[n], datasets.ClassLabel)), None)
        label_column = label_column or next((n for n in ("label", "labels") if n in names), None)
    if image_column is None:
        raise EvitError(f"no image column found among {names}: name it with --image-column")
    for what, col in (("image", image_column), ("label", label_column)):
        if col is not None and col not in names:
            raise EvitError(f"--{what}-column {col!r} is not a column of the data set; it has {names}")
    return image_column, label_column


def load_image_data(
    source: str,
    *,
    train_split: str = "train",
    val_split: str | None = None,
    val_fraction: float = 0.1,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    seed: int = 0,
    whole_if_no_val: bool = False,
) -> ImageData:
    """Train and validation splits with their image/label columns and class names.

    A data set without a label column (a flat folder of images) has ``label_column`` None and no
    class names: it can be evaluated for agreement with the dense model, and trained by distillation.

    Without a validation split, a seeded ``val_fraction`` of train is held out, or, with
    ``whole_if_no_val`` (evaluation), the whole train split is the validation split.
    """
    import datasets

    datasets.disable_caching()  # splits, samples and casts go to temp files, never into the user's data folder
    ds = _load(source, streaming)
    if not isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = {"train": ds}
    if train_split not in ds and whole_if_no_val and len(ds) == 1:
        train_split = next(iter(ds))  # evaluation of a single-split data set
    if train_split not in ds:
        raise EvitError(f"data set {source} has no split {train_split!r}; it has {list(ds)}: use --train-split")
    train = ds[train_split]
    if val_split is None:
        val_split = next((s for s in VAL_SPLITS if s in ds), None)
    if val_split is not None:
        if val_split not in ds:
            raise EvitError(f"data set {source} has no split {val_split!r}; it has {list(ds)}: use --val-split")
        val, val_source = ds[val_split], f"split {val_split!r}"
    elif whole_if_no_val:
        val, val_source = train, f"split {train_split!r} (all of it)"
    elif streaming:
        raise EvitError("a streamed data set without a validation split: give --val-split, or drop --streaming")
    else:  # carve a seeded validation split from train
        if not 0 < val_fraction < 1:
            raise EvitError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        parts = train.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column=None)
        train, val = parts["train"], parts["test"]
        val_source = f"{val_fraction:g} of split {train_split!r} held out (seed {seed})"
    image_column, label_column = _find_columns(train.features, image_column, label_column)
    class_names = _class_names(train, label_column, streaming) if label_column else []
    return ImageData(train, val, image_column, label_column, class_names, val_source)


def _class_names(train, label_column: str, streaming: bool) -> list[str]:
    """A ClassLabel's names, or the integer labels 0..N-1 as text."""
    import datasets

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if streaming:
        raise EvitError(f"column {label_column!r} is not a ClassLabel: class names are unknown when streaming")
    values = sorted(set(train.unique(label_column)))
    if values != list(range(len(values))):
        raise EvitError(f"labels in {label_column!r} must be 0..N-1 or a ClassLabel, got {values[:5]}...")
    return [str(v) for v in values]


def transforms(data_config: dict, *, train: bool, randaugment: str | None = None, re_prob: float = 0.0,
               color_jitter: float = 0.0):
    """timm's transforms from the model's data config (mean/std, interpolation, crop).

    Training: random-resized crop and horizontal flip, plus RandAugment, colour jitter and random
    erasing when asked.
    """
    from timm.data import create_transform

    kw = dict(input_size=data_config["input_size"], interpolation=data_config.get("interpolation", "bicubic"),
              mean=data_config["mean"], std=data_config["std"], crop_pct=data_config.get("crop_pct", 0.875),
              crop_mode=data_config.get("crop_mode", "center"))
    if train:
        return create_transform(**{k: v for k, v in kw.items() if k not in ("crop_pct", "crop_mode")},
                                is_training=True, auto_augment=randaugment or None, re_prob=re_prob,
                                color_jitter=color_jitter or None)
    return create_transform(**kw, is_training=False)


def sample_size(ds, limit: int | None = None) -> int | None:
    """How many images reading ``ds`` (at most ``limit`` of them) gives; None for a stream."""
    n = len(ds) if hasattr(ds, "__len__") else None
    if n is None:
        return limit
    return min(n, limit) if limit else n


class BadImages:
    """One run's images that cannot be decoded: stop with the image's name (default), or, with
    ``skip`` (``--skip-bad-images``), skip each and count it. The count is shared with the
    DataLoader workers the run starts, which receive this object with the data set."""

    def __init__(self, skip: bool = False):
        import multiprocessing

        self.skip = skip
        self._count = multiprocessing.Value("i", 0)

    def add(self) -> None:
        with self._count.get_lock():
            self._count.value += 1

    @property
    def count(self) -> int:
        return self._count.value


def _image_source(value):
    """(name for messages, what PIL opens) for a path, bytes, a datasets image dict or a PIL image."""
    import io

    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        return (path or "<an image stored in the data set>"), (io.BytesIO(data) if data is not None else path)
    if isinstance(value, (bytes, bytearray)):
        return "<an image stored in the data set>", io.BytesIO(value)
    if isinstance(value, (str, Path)):
        return str(value), str(value)
    return getattr(value, "filename", "") or "<an image>", None


def open_image(value, bad: BadImages | None = None,
               hint: str = "remove it, or pass --skip-bad-images to skip such images"):
    """An RGB PIL image; an undecodable one (or one above PIL's decompression-bomb limit) is an
    EvitError naming it, or, when ``bad`` skips, counted in ``bad`` and returned as None."""
    import warnings

    from PIL import Image

    name, source = _image_source(value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if source is None:  # already a PIL image
                value.load()
                return value.convert("RGB")
            with Image.open(source) as img:
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        problem = "is larger than PIL's safety limit (a decompression bomb?)"
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # UnidentifiedImageError is an OSError
        problem = _why_unreadable(e)
    if bad is not None and bad.skip:
        bad.add()
        return None
    raise EvitError(f"cannot read image {name}: it {problem}; {hint}")


def _why_unreadable(e: Exception) -> str:
    if isinstance(e, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, PermissionError):
        return "cannot be opened (permission denied)"
    return f"cannot be decoded ({e.__class__.__name__})"


def _undecoded(ds, image_column: str):
    """``ds`` with its image column left as files/bytes, so that decoding happens in ``open_image``."""
    import datasets

    features = getattr(ds, "features", None) or {}
    feature = features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


NO_LABEL = -1


def with_transform(ds, image_column: str, label_column: str | None, tf, *, seed: int | None = None,
                   label_map: list[int] | None = None, bad: BadImages | None = None):
    """Apply ``tf`` lazily; map-style data stays memory-mapped.

    Items are ``{"pixel_values", "label"}``; the label is ``label_map[label]`` when a map is given,
    and -1 without labels. With ``seed``, a map-style data set draws each item's augmentation from
    (seed, epoch, index) alone (see :class:`ImageDataset`). Images that cannot be decoded stop the
    run with their name, or, when ``bad`` skips, are counted in it and skipped (``pixel_values``
    None, which ``collate`` leaves out).
    """
    ds = _undecoded(ds, image_column)

    def label(value):
        if label_column is None:
            return NO_LABEL
        return label_map[value] if label_map is not None else value

    def apply(batch):
        images = [open_image(value, bad) for value in batch[image_column]]
        return {
            "pixel_values": [None if img is None else tf(img) for img in images],
            "label": [label(v) for v in batch[label_column]] if label_column else [NO_LABEL] * len(images),
        }

    if isinstance(ds, torch.utils.data.IterableDataset) or hasattr(ds, "_ex_iterable"):
        return ds.map(apply, batched=True, batch_size=16, remove_columns=list(ds.features or []))
    return ImageDataset(ds, image_column, label_column, tf, label, seed, bad)


class ImageDataset(torch.utils.data.Dataset):
    """A map-style data set's images through a transform, drawn item by item.

    With a ``seed``, item ``i`` of epoch ``e`` is transformed under RNGs seeded from (seed, e, i)
    and the caller's RNG states are restored after: the augmentation of an item does not depend on
    which worker draws it or on what was drawn before, so a resumed run sees the same images.
    """

    def __init__(self, ds, image_column: str, label_column: str | None, tf, label, seed: int | None,
                 bad: BadImages | None = None):
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.tf, self.label, self.seed = tf, label, seed
        self.bad = bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        img = open_image(row[self.image_column], self.bad)
        if img is None:
            x = None
        elif self.seed is None:
            x = self.tf(img)
        else:
            with item_rng(self.seed, self.epoch, int(i)):
                x = self.tf(img)
        return {"pixel_values": x, "label": self.label(row[self.label_column] if self.label_column else None)}


@contextlib.contextmanager
def item_rng(seed: int, epoch: int, index: int):
    """Seed Python's, NumPy's and torch's CPU RNGs from (seed, epoch, index); restore them after."""
    s = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def collate(batch):
    batch = [b for b in batch if b["pixel_values"] is not None]  # skipped images
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([b["pixel_values"] for b in batch]), torch.tensor([b["label"] for b in batch])


class _Loader(DataLoader):
    """A DataLoader that leaves out batches whose every image was skipped."""

    def __iter__(self):
        return (b for b in super().__iter__() if b[1].numel())


class ResumableSampler(Sampler[int]):
    """A seeded per-epoch permutation, sharded over ranks, that can start part-way through.

    Resuming mid-epoch skips the batches already done without reading them.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank has as many
        return iter(order[self.rank:: self.world][self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def make_loader(ds, *, batch_size: int, workers: int, sampler=None, drop_last: bool = False, seed: int = 0):
    from ..model.validate import non_negative_int, positive_int

    positive_int("--batch-size", batch_size)
    non_negative_int("--workers", workers)
    iterable = isinstance(ds, IterableDataset) or not hasattr(ds, "__len__")
    return _Loader(
        ds, batch_size=batch_size, sampler=None if iterable else sampler, num_workers=workers,
        collate_fn=collate, drop_last=drop_last, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------- mixing a batch


def mix_batch(images: torch.Tensor, mixup: float, cutmix: float):
    """One batch mixed with itself in reversed order: with probability 0.5 (or always, when only one
    is on) mixup, ``lam x + (1 - lam) x[perm]``, else CutMix, a box of ``x[perm]`` pasted over a
    share ``1 - lam`` of each image; ``lam ~ Beta(alpha, alpha)`` (torch's seeded generator, saved
    in checkpoints). Returns the mixed images, the share ``lam`` of each image's own pixels (after
    clipping the box) and ``perm``.

    The same mixed tensor goes to the student and the teacher (function matching: Beyer et al.,
    "Knowledge distillation: a good teacher is patient and consistent", CVPR 2022).
    """
    perm = torch.arange(images.shape[0] - 1, -1, -1, device=images.device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if not use_cutmix:
        return lam * images + (1 - lam) * images[perm], lam, perm
    h, w = images.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / (h * w), perm


def mixed_target(target: torch.Tensor, num_classes: int, lam: float, perm: torch.Tensor,
                 smoothing: float) -> torch.Tensor:
    """Soft targets of a mixed batch: each image's label smoothed, mixed in the share of its pixels."""
    off = smoothing / num_classes
    one_hot = torch.full((target.shape[0], num_classes), off, device=target.device)
    one_hot.scatter_(1, target[:, None], 1 - smoothing + off)
    return lam * one_hot + (1 - lam) * one_hot[perm]
