"""Which layers reorganize, at what keep rate: parsing and validation."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EvitError
from .restore import RestoreSpec, parse_restore

DEFAULT_LAYERS = (4, 7, 10)  # the paper's DeiT setting (1-based)
METHODS = ("evit", "squeeze")  # the paper's reorganization (the default), and the squeeze (docs/algorithm.md)
# what ranks the tokens (docs/algorithm.md): the class token's attention row (the paper's), the attention row of
# the mean query, the attention each token receives averaged over all queries, an attention-pool head's own probe
SCORES = ("cls", "mean_query", "received", "probe")
NO_CLASS_TOKEN_SCORE = "received"  # the default without a class token (benchmarks/no_class_token_real.py)


@dataclass(frozen=True)
class EViTConfig:
    """``layers`` are 1-based block numbers, as in the paper; one keep rate per layer.
    ``proportional``: proportional attention (timm models; measured, off by default, see the README).
    ``method``: ``"evit"`` (the paper's: keep, fuse the rest into one token) or ``"squeeze"`` (keep, squeeze
    each other token into its most similar kept one; timm models, see docs/algorithm.md).
    ``score``: what ranks the tokens, one of ``SCORES`` (``"cls"``: class attention, the paper's; the others need
    no class token and fuse into the score-weighted mean, see docs/algorithm.md).
    ``restore``: how the removed patches are put back for dense prediction (``algorithm/restore.py``; ``None``: not
    set, the default strategy)."""

    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    fuse: bool = True
    proportional: bool = False
    method: str = "evit"
    score: str = "cls"
    restore: RestoreSpec | None = None

    def to_dict(self) -> dict:
        d = {"layers": list(self.layers), "keep_rates": list(self.keep_rates), "fuse": self.fuse}
        if self.proportional:
            d["proportional_attention"] = True
        if self.method != "evit":  # dicts without it (older exports) are the paper's method
            d["method"] = self.method
        if self.score != "cls":  # dicts without it (older exports) rank by class attention
            d["score"] = self.score
        if self.restore is not None:  # dicts without it (older exports, or not set) restore as the default
            d["restore"] = self.restore.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EViTConfig":
        return cls(tuple(d["layers"]), tuple(d["keep_rates"]), bool(d.get("fuse", True)),
                   bool(d.get("proportional_attention", False)), str(d.get("method", "evit")),
                   str(d.get("score", "cls")), parse_restore(d["restore"]) if d.get("restore") else None)

    @property
    def restore_spec(self) -> RestoreSpec:
        """How the removed patches are put back: the one set, else the default."""
        return self.restore or RestoreSpec()

    @property
    def adds_token(self) -> bool:
        """Whether a reorganizing layer adds a token of its own (the paper's fused token)."""
        return self.fuse and self.method == "evit"

    @property
    def fuses_mean(self) -> bool:
        """Whether the fused token is the score-weighted mean of what it fuses (the class-token-free
        scores: it stands for its patches) rather than the paper's raw class-attention-weighted sum."""
        return self.score != "cls"

    @property
    def indices(self) -> tuple[int, ...]:
        """0-based block indices."""
        return tuple(layer - 1 for layer in self.layers)


def _split(text: str, option: str, example: str) -> list[str]:
    """Comma-separated entries, spaces allowed around them; an empty entry (``0.7,,0.5``) is refused."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise EvitError(f"{option} is empty: give at least one value, e.g. {option} {example}")
    if not all(parts):
        raise EvitError(f"{option} {text!r} has an empty entry: separate the values by single commas, e.g. {example}")
    return parts


def parse_layers(value, option: str = "--layers") -> tuple[int, ...]:
    if isinstance(value, str):
        parts = _split(value, option, "4,7,10")
        try:
            layers = tuple(int(p) for p in parts)
        except ValueError:
            raise EvitError(f"{option} must be comma-separated block numbers such as 4,7,10, got {value!r}") from None
    else:
        values = (value,) if isinstance(value, int) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in values):
            raise EvitError(f"--layers must be block numbers such as 4,7,10, got {value!r}")
        layers = tuple(int(v) for v in values)
    if not layers:
        raise EvitError("--layers is empty: give at least one block number, e.g. --layers 4,7,10")
    return layers


def parse_keep_rates(value, option: str = "--keep-rate") -> tuple[float, ...]:
    if isinstance(value, bool):
        raise EvitError(f"--keep-rate must be a number in (0, 1], got {value!r}")
    if isinstance(value, (int, float)):
        rates = (float(value),)
    elif isinstance(value, str):
        parts = _split(value, option, "0.9,0.8,0.7")
        try:
            rates = tuple(float(p) for p in parts)
        except ValueError:
            raise EvitError(f"{option} must be a number in (0, 1] or one per layer such as 0.9,0.8,0.7, "
                            f"got {value!r}") from None
    else:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise EvitError(f"--keep-rate must be numbers in (0, 1] such as 0.9,0.8,0.7, got {value!r}")
        rates = tuple(float(v) for v in values)
    if not rates:
        raise EvitError("--keep-rate is empty: give at least one value, e.g. --keep-rate 0.7")
    for r in rates:
        if not 0.0 < r <= 1.0:  # nan fails this too
            raise EvitError(f"keep rate {r} is outside (0, 1]: 0.7 keeps 70% of the tokens")
    return rates


def check_score(score: str) -> str:
    """``score`` when it is one of ``SCORES``; else the one-line error."""
    if score not in SCORES:
        raise EvitError(f"score {score!r} is not one of {', '.join(SCORES)}")
    return score


def make_config(layers, keep_rate, depth: int, fuse: bool = True, proportional: bool | None = None,
                method: str = "evit", score: str = "cls", restore=None) -> EViTConfig:
    """Validate user input against a model of ``depth`` blocks.

    ``keep_rate`` is one value for every layer or one per layer; ``proportional`` ``None``: on for the
    ``squeeze`` method (it is part of it), off for the paper's. ``restore``: anything ``restore.parse_restore``
    reads, or ``None`` (not set).
    """
    if method not in METHODS:
        raise EvitError(f"method {method!r} is not one of {', '.join(METHODS)}")
    check_score(score)
    restore = None if restore is None else parse_restore(restore)
    if proportional is None:
        proportional = method == "squeeze"
    if method == "squeeze" and not fuse:
        raise EvitError("the squeeze method merges every inattentive token into a kept one: it has no --no-fuse "
                        "(that is the evit method's drop ablation)")
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
    if proportional and not fuse:
        raise EvitError("proportional attention weighs the fused token by the patches it holds: it needs fusing "
                        "(drop --no-fuse)")
    return EViTConfig(layers, rates, fuse, bool(proportional), method, score, restore)


