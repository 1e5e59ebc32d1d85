"""What an image item becomes: decoded (or skipped, :class:`BadImages`), transformed with timm's
transforms of the model, and batched by a DataLoader.

With a seed, each item's augmentation is a function of (seed, epoch, index) alone
(:func:`item_rng`), whatever worker draws it: a resumed run sees the same images.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import EvitError


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

