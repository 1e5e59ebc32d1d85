"""A model's ``preprocessor_config.json`` -> timm's data config, read the way transformers reads it.

Every form the hub holds is accepted because transformers' own image processor
class normalises it: legacy feature-extractor ints (``"size": 256,
"crop_size": 224``), ``{"shortest_edge": N}``, ``{"height": H, "width": W}``,
and no file at all (the family's processor defaults). The processor's
``size``/``crop_size`` then map onto timm's transform:

- ``{"height", "width"}`` resize (aspect ignored) -> ``crop_mode="squash"``;
- ``{"shortest_edge"}`` resize (aspect kept) -> ``crop_mode="center"``;
- a center crop of C after a resize to S -> ``crop_pct = C / S``, input C.
"""

from __future__ import annotations

from ...errors import EvitError

# PIL resampling codes -> timm interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def processor_class_name(proc: dict | None, default: str) -> str:
    proc = proc or {}
    name = proc.get("image_processor_type") or proc.get("feature_extractor_type") or default
    name = name.replace("FeatureExtractor", "ImageProcessor")
    return name[: -len("Fast")] if name.endswith("Fast") else name


def image_processor(proc: dict | None, default: str):
    """transformers' image processor for the settings ``proc`` (a preprocessor_config.json dict)."""
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    name = processor_class_name(proc, default)
    cls = get_image_processor_class_from_name(name)
    if cls is None:
        raise EvitError(f"preprocessor_config.json names {name}, which this transformers does not have: "
                        "upgrade transformers")
    settings = {k: v for k, v in (proc or {}).items()
                if k not in ("image_processor_type", "feature_extractor_type", "processor_class")}
    try:
        return cls.from_dict(settings) if settings else cls()
    except (TypeError, ValueError) as e:
        raise EvitError(f"preprocessor_config.json cannot be read by {name} ({e}): "
                        "is it the model's own file?") from None


def _edge(size) -> tuple[int, str]:
    """(resize length, timm crop mode) of a normalised processor ``size``."""
    height = getattr(size, "height", None) if not isinstance(size, dict) else size.get("height")
    shortest = getattr(size, "shortest_edge", None) if not isinstance(size, dict) else size.get("shortest_edge")
    if height:
        return int(height), "squash"
    if shortest:
        return int(shortest), "center"
    raise EvitError(f"the image processor's size {dict(size)} has neither height nor shortest_edge: not supported yet")


def data_config(proc: dict | None, default_processor: str, img_size: int | None = None) -> dict:
    """timm-style preprocessing equal to what transformers' processor does with ``proc``."""
    p = image_processor(proc, default_processor)
    resize, mode = _edge(p.size) if getattr(p, "do_resize", True) and p.size is not None else (None, "center")
    crop = _edge(p.crop_size)[0] if getattr(p, "do_center_crop", False) and getattr(p, "crop_size", None) else None
    size = crop or resize or img_size
    if proc is None and img_size and size != img_size:  # no processor file: the default's geometry at the model's size
        resize, crop = (round(img_size * resize / crop), img_size) if crop and resize else (img_size, None)
        size = img_size
    resample = p.resample if getattr(p, "resample", None) is not None else 2
    return {
        "input_size": (3, size, size),
        "interpolation": _RESAMPLE.get(int(resample), "bilinear"),
        "mean": tuple(float(v) for v in (p.image_mean if getattr(p, "do_normalize", True) else (0.0, 0.0, 0.0))),
        "std": tuple(float(v) for v in (p.image_std if getattr(p, "do_normalize", True) else (1.0, 1.0, 1.0))),
        "crop_pct": (size / resize) if (crop and resize) else 1.0,
        "crop_mode": mode,
    }


def input_size(proc: dict | None, default_processor: str) -> int | None:
    """The side of the images the processor hands the model (its crop, else its resize)."""
    return data_config(proc, default_processor)["input_size"][1] if proc else None
