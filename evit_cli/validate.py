"""Range and type checks for every numeric input, in one place.

The command line runs them when an option is parsed (``cli.py`` turns each into
an option callback); recipes and library calls go through the same functions,
so a value is refused with the same one-line message wherever it comes from.
Each check takes a label (``--batch``) and a value and returns the value, or
raises :class:`EvitError`.
"""

from __future__ import annotations

import math
import re

from .errors import EvitError


def _number(label: str, value, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "an integer" if integer else "a number"
        raise EvitError(f"{label} must be {what}, got {value!r}")
    if integer and not float(value).is_integer():
        raise EvitError(f"{label} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise EvitError(f"{label} must be a finite number, got {value}")
    return int(value) if integer else float(value)


def positive_int(label: str, value) -> int:
    value = _number(label, value, True)
    if value < 1:
        raise EvitError(f"{label} must be at least 1, got {value}")
    return value


def non_negative_int(label: str, value) -> int:
    value = _number(label, value, True)
    if value < 0:
        raise EvitError(f"{label} must be 0 or more, got {value}")
    return value


def positive(label: str, value) -> float:
    value = _number(label, value, False)
    if value <= 0:
        raise EvitError(f"{label} must be above 0, got {value:g}")
    return value


def non_negative(label: str, value) -> float:
    value = _number(label, value, False)
    if value < 0:
        raise EvitError(f"{label} must be 0 or more, got {value:g}")
    return value


def open_fraction(label: str, value) -> float:
    """Strictly between 0 and 1 (a share held out)."""
    value = _number(label, value, False)
    if not 0 < value < 1:
        raise EvitError(f"{label} must be between 0 and 1 (exclusive), got {value:g}")
    return value


def below_one(label: str, value) -> float:
    """0 <= value < 1 (label smoothing)."""
    value = _number(label, value, False)
    if not 0 <= value < 1:
        raise EvitError(f"{label} must be at least 0 and below 1, got {value:g}")
    return value


def unit_interval(label: str, value) -> float:
    """0 <= value <= 1 (a mixing weight)."""
    value = _number(label, value, False)
    if not 0 <= value <= 1:
        raise EvitError(f"{label} must be between 0 and 1, got {value:g}")
    return value


def percent(label: str, value) -> float:
    """0 <= value <= 100 (a share of images, in %)."""
    value = _number(label, value, False)
    if not 0 <= value <= 100:
        raise EvitError(f"{label} is a percentage: give a value from 0 to 100, got {value:g}")
    return value


def one_of(*choices: str):
    def check(label: str, value) -> str:
        if value not in choices:
            raise EvitError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def boolean(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise EvitError(f"{label} must be true or false, got {value!r}")
    return value


def text(label: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EvitError(f"{label} must be a non-empty text, got {value!r}")
    return value


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device(label: str, value) -> str:
    """cpu, cuda or cuda:N; checked against the hardware later, when the model is moved."""
    value = text(label, value)
    if not _DEVICE.match(value):
        raise EvitError(f"unknown device {value!r} for {label}: use cpu, cuda or cuda:N")
    return value


def randaugment(label: str, value) -> str:
    """A timm RandAugment policy string (rand-m9-mstd0.5-inc1), parsed the way timm will."""
    from timm.data.auto_augment import rand_augment_transform

    value = text(label, value)
    try:
        rand_augment_transform(value, hparams={})
    except Exception as e:  # noqa: BLE001 - timm raises assertion/key/value errors for a bad policy
        raise EvitError(f"{label} {value!r} is not a timm RandAugment policy ({type(e).__name__}): "
                        "use e.g. rand-m9-mstd0.5-inc1") from None
    return value


def int_list(label: str, value) -> tuple[int, ...]:
    """Comma-separated positive integers (batch sizes); an empty entry is refused."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        raise EvitError(f"{label} must be comma-separated integers such as 1,8, got {value!r}") from None
    for n in numbers:
        positive_int(label, n)
    return numbers


def image_size(label: str, model, size: int) -> int:
    """An input size the model's patch grid divides (a size in between would be cut silently)."""
    from . import adapters

    adapter = adapters.get_adapter(model)
    grid = round((adapter.num_tokens(model) - adapter.num_prefix_tokens(model)) ** 0.5)
    patch = adapter.img_size(model) // grid
    if size % patch:
        below, above = size // patch * patch, (size // patch + 1) * patch
        choices = f"{below} or {above}" if below else str(above)
        raise EvitError(f"{label} {size} is not a multiple of the patch size {patch}: use {choices}")
    return size


def optional(check):
    """``check``, letting None through (an option that was not given)."""
    def run(label: str, value):
        return None if value is None else check(label, value)
    return run


# Every TrainConfig field a recipe or a flag can set, with its check. keep_rate and layers
# are checked by config.make_config against the model, model/dataset/output by their loaders.
TRAIN_CHECKS = {
    "val_fraction": open_fraction, "workers": non_negative_int, "steps_per_epoch": optional(positive_int),
    "randaugment": optional(randaugment), "mixup": non_negative, "cutmix": non_negative, "smoothing": below_one,
    "epochs": positive, "batch_size": positive_int, "lr": optional(positive), "lr_per_512": optional(positive),
    "min_lr": non_negative, "weight_decay": non_negative, "warmup_epochs": non_negative,
    "clip_grad": optional(positive), "accum_steps": positive_int, "seed": non_negative_int,
    "device": optional(device), "shrink_start": non_negative, "shrink_epochs": non_negative,
    "distill_alpha": unit_interval, "distill_tau": positive, "save_every": non_negative_int,
    "bench_batch": positive_int, "pretrained": boolean, "streaming": boolean, "amp": boolean,
    "distill": optional(boolean), "resume": boolean, "overwrite": boolean, "bench": boolean,
    "train_split": text, "val_split": optional(text), "image_column": optional(text),
    "label_column": optional(text), "teacher": optional(text), "checkpoint": optional(text),
    "color_jitter": non_negative, "checkpoint_dir": optional(text), "head": one_of("auto", "keep", "new"),
    "img_size": optional(positive_int), "oracle": optional(boolean), "num_classes": optional(non_negative_int),
}


def train_config(cfg) -> None:
    """Check every field of a TrainConfig (recipe and flags merged) that has a check."""
    for name, check in TRAIN_CHECKS.items():
        if hasattr(cfg, name):
            setattr(cfg, name, check("--" + name.replace("_", "-"), getattr(cfg, name)))
    if cfg.lr is not None and cfg.min_lr > cfg.lr:
        raise EvitError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: lower --min-lr")
