"""Range and type checks for every numeric input, in one place.

The command line runs them when an option is parsed (``cli/options.py`` turns each into
an option callback); recipes and library calls go through the same functions,
so a value is refused with the same one-line message wherever it comes from.
Each check takes a label (``--batch``) and a value and returns the value, or
raises :class:`EvitError`.
"""

from __future__ import annotations

import math
import re

from ..errors import EvitError, size_text


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
    """An input size the model's patch grid divides (a size in between would be cut silently), and
    whose one-image forward pass fits in memory."""
    from .. import adapters

    adapter = adapters.get_adapter(model)
    patch = _patch_size(adapter, model)
    if size % patch:
        below, above = size // patch * patch, (size // patch + 1) * patch
        choices = f"{below} or {above}" if below else str(above)
        raise EvitError(f"{label} {size} is not a multiple of the patch size {patch}: use {choices}")
    fits_in_memory(label, size, model, img_size=size)
    return size


def _patch_size(adapter, model) -> int:
    grid = round((adapter.num_tokens(model) - adapter.num_prefix_tokens(model)) ** 0.5)
    return adapter.img_size(model) // grid


def _width(model) -> int:
    """The token width: the size the first LayerNorm normalizes (0 when there is none)."""
    from torch import nn

    norm = next((m for m in model.modules() if isinstance(m, nn.LayerNorm)), None)
    return int(norm.normalized_shape[-1]) if norm is not None else 0


def forward_bytes(model, *, batch: int = 1, img_size: int | None = None) -> int:
    """A lower bound on the memory one inference pass takes: the float32 images, the token stream
    and the MLP's hidden layer (4x wide) of one block. Attention's own memory is left out (fused
    kernels need little), so a size refused here cannot run at all."""
    from .. import adapters

    adapter = adapters.get_adapter(model)
    size = img_size or adapter.img_size(model)
    tokens = (size // _patch_size(adapter, model)) ** 2 + adapter.num_prefix_tokens(model)
    return 4 * batch * (3 * size * size + 6 * tokens * _width(model))


def available_memory(device="cpu") -> int | None:
    """Bytes ``device`` can still give: a GPU's free memory, or the RAM (plus free swap) Linux
    reports available; None where it cannot be told."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii"))
        return sum(int(info[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def fits_in_memory(label: str, value, model, *, batch: int = 1, img_size: int | None = None, device="cpu") -> None:
    """Refuse, before anything is allocated, a batch or image size whose forward pass cannot fit."""
    need, have = forward_bytes(model, batch=batch, img_size=img_size), available_memory(device)
    if have is not None and need > have:
        where = "the GPU has free" if str(device).startswith("cuda") else "this machine has available"
        raise EvitError(f"{label} {value} needs at least {size_text(need)} of memory for one pass, more than the "
                        f"{size_text(have)} {where}: lower {label}")


def head_fits(label: str, classes: int, width: int) -> None:
    """Refuse a classifier head (float32 weights, and a label text per class) larger than the memory left."""
    need, have = classes * (4 * width + 100), available_memory()
    if have is not None and need > have:
        raise EvitError(f"{label} {classes} needs about {size_text(need)} of memory for the classifier head, more "
                        f"than the {size_text(have)} this machine has available: lower {label}")


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _int_list(value) -> bool:
    return isinstance(value, list) and all(_is_int(v, 1) for v in value)


def _number_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


# What each field of an exported folder's evit.json must hold, in words and as a test.
_META_TYPES = {
    "family": ("'timm' or 'transformers'", lambda v: v in ("timm", "transformers")),
    "num_classes": ("an integer, 0 or more", lambda v: _is_int(v, 0)),
    "img_size": ("a positive integer", lambda v: _is_int(v, 1)),
    "num_tokens": ("a positive integer", lambda v: _is_int(v, 1)),
    "tool_version": ("a text", lambda v: isinstance(v, str)),
    "token_counts": ("a list of positive integers", lambda v: v is None or _int_list(v)),
    "class_names": ("a list of texts", lambda v: v is None
                    or (isinstance(v, list) and all(isinstance(c, str) for c in v))),
    "evit": ("an object with layers and keep_rates", lambda v: v is None or (
        isinstance(v, dict) and _int_list(v.get("layers")) and _number_list(v.get("keep_rates")))),
    "data_config": ("an object", lambda v: v is None or isinstance(v, dict)),
    "training": ("an object", lambda v: v is None or isinstance(v, dict)),
    "format_version": ("an integer", lambda v: _is_int(v, 0)),
}
_SOURCE_TYPES = {
    "model": ("a text", lambda v: v is None or isinstance(v, str)),  # None: a module built by hand, not by name
    "kwargs": ("an object", lambda v: v is None or isinstance(v, dict)),
    "checkpoint": ("a text", lambda v: v is None or isinstance(v, str)),
}


def export_meta(path, meta: dict) -> None:
    """The fields of an exported folder's evit.json have the types the tool wrote (a hand-edited or
    damaged file is refused here, not deep inside the model's construction)."""
    for fields, where, data in ((_META_TYPES, "", meta), (_SOURCE_TYPES, "source.", meta["source"])):
        for key, (what, ok) in fields.items():
            if key in data and not ok(data[key]):
                raise EvitError(f"{path}: {where}{key} must be {what}, got {data[key]!r}: export the model again")


def optional(check):
    """``check``, letting None through (an option that was not given)."""
    def run(label: str, value):
        return None if value is None else check(label, value)
    return run


DISTILL_LOSSES = ("auto", "mse", "kl", "cosine")  # --distill-loss (evit_cli.train.config): distill.distill_kind
