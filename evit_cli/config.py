"""Which layers reorganize, at what keep rate: parsing and validation."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EvitError

DEFAULT_LAYERS = (4, 7, 10)  # the paper's DeiT setting (1-based)


@dataclass(frozen=True)
class EViTConfig:
    """``layers`` are 1-based block numbers, as in the paper; one keep rate per layer."""

    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    fuse: bool = True

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "keep_rates": list(self.keep_rates), "fuse": self.fuse}

    @classmethod
    def from_dict(cls, d: dict) -> "EViTConfig":
        return cls(tuple(d["layers"]), tuple(d["keep_rates"]), bool(d.get("fuse", True)))

    @property
    def indices(self) -> tuple[int, ...]:
        """0-based block indices."""
        return tuple(layer - 1 for layer in self.layers)


def _split(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def parse_layers(value) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = _split(value)
        try:
            layers = tuple(int(p) for p in parts)
        except ValueError:
            raise EvitError(f"--layers must be comma-separated block numbers such as 4,7,10, got {value!r}") from None
    else:
        layers = tuple(int(v) for v in value)
    if not layers:
        raise EvitError("--layers is empty: give at least one block number, e.g. --layers 4,7,10")
    return layers


def parse_keep_rates(value) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, str):
        try:
            return tuple(float(p) for p in _split(value))
        except ValueError:
            raise EvitError(f"--keep-rate must be a number in (0, 1] or one per layer such as 0.9,0.8,0.7, got {value!r}") from None
    return tuple(float(v) for v in value)


def make_config(layers, keep_rate, depth: int, fuse: bool = True) -> EViTConfig:
    """Validate user input against a model of ``depth`` blocks.

    ``keep_rate`` is one value for every layer or one per layer.
    """
    layers = parse_layers(layers)
    rates = parse_keep_rates(keep_rate)
    for layer in layers:
        if not 1 <= layer <= depth:
            raise EvitError(f"layer {layer} is out of range: the model has {depth} blocks, numbered 1 to {depth}")
    if len(set(layers)) != len(layers):
        raise EvitError(f"--layers {','.join(map(str, layers))} repeats a block: give each block once")
    if list(layers) != sorted(layers):
        raise EvitError(f"--layers must be in increasing order, got {','.join(map(str, layers))}")
    if len(rates) == 1:
        rates = rates * len(layers)
    if len(rates) != len(layers):
        raise EvitError(
            f"{len(rates)} keep rates for {len(layers)} layers: give one keep rate, or one per layer"
        )
    for r in rates:
        if not 0.0 < r <= 1.0:
            raise EvitError(f"keep rate {r} is outside (0, 1]: 0.7 keeps 70% of the tokens")
    return EViTConfig(layers, rates, fuse)


