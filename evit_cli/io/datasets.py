"""Image classification data sets through `datasets`: hub names, image folders, saved data sets, parquet.

Map-style data sets stay memory-mapped Arrow (nothing is loaded whole);
``streaming=True`` reads a hub or parquet data set as it goes. What an item becomes (decoded,
transformed) is :mod:`.images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # every failure of datasets becomes our one line
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
    dirs = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and d.name.lower() in ("train",) + VAL_SPLITS}
    splits = {k: _images(d) for k, d in dirs.items()}
    splits = {k: v for k, v in splits.items() if v} or {"train": _images(root)}
    if not any(splits.values()):
        raise EvitError(f"no images under {root}: an image folder has a subfolder of images per class")
    for split, files in splits.items():
        check_class_folders(dirs.get(split, root), files)
    return splits


def _images(d: Path) -> list[str]:
    return sorted(str(f) for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def check_class_folders(folder: Path, files: list[str]) -> None:
    """Refuse a folder of images that cannot mean what it seems to: one image in all, a class folder
    without an image beside others with images, or a single class folder (a labelled folder needs
    two or more classes; loose images in one flat folder are the unlabelled kind). ``files``: the
    images under ``folder`` (:func:`_images`), counted here rather than listed again."""
    loose = 0
    classes = {d.name: 0 for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    for f in files:
        parts = Path(f).relative_to(folder).parts
        if len(parts) == 1:
            loose += 1
        elif parts[0] in classes:
            classes[parts[0]] += 1
    if loose + sum(classes.values()) == 1:
        raise EvitError(f"{folder} holds a single image: fine-tuning and evaluation need several; add images")
    if loose or not classes:
        return
    empty = [name for name, n in classes.items() if n == 0]
    if empty:
        raise EvitError(f"class folder {empty[0]!r} of {folder} holds no image: add images to it, or remove it")
    if len(classes) == 1:
        (name,) = classes
        raise EvitError(f"{folder} has a single class folder ({name!r}): give a subfolder of images for each of two "
                        "or more classes, or put the images straight into one folder for label-free use")


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


def sample_size(ds, limit: int | None = None) -> int | None:
    """How many images reading ``ds`` (at most ``limit`` of them) gives; None for a stream."""
    n = len(ds) if hasattr(ds, "__len__") else None
    if n is None:
        return limit
    return min(n, limit) if limit else n

