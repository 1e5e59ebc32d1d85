"""Searching for the cheapest EViT configuration.

By cost (:func:`search`): for each candidate layer set, the keep rate that meets a GMACs or
speed-up target. By accuracy (:func:`search_by_accuracy`): the cheapest layer set and per-layer keep
rates within a fidelity constraint.

On a calibration sample (images decoded once, the dense model's outputs computed once), a greedy
coordinate descent lowers one layer's keep rate by one step of a grid at a time: of the moves that
keep the constraint (top-1 within ``max_drop`` points of the dense model with labels, agreement
with the dense model at least ``min_agreement`` % without, or for a headless (embedding) model the
cosine to the dense embedding at least ``min_cosine``), it takes the one that costs the least
KL(dense || EViT) (for an embedding model: 1 - cosine) per counted MAC saved, until no move keeps
the constraint. A layer whose rate stays 1.0 is not an EViT layer. For comparison it also finds
the best single keep rate at the same layers.
"""

from __future__ import annotations

import copy
import os
import shlex

import torch
from torch import nn

from .. import adapters
from ..algorithm.config import METHODS
from ..errors import EvitError
from ..model.convert import convert_module, dense_copy, get_config, reorganized_as
from ..model.macs import count_macs, largest_keep_rate_under
from ..model.validate import optional, positive, unit_interval
from ..utils.progress import Progress
from .bench import median_times
from .evaluate import Evaluator, is_embedding
from .fidelity import Tally, outputs
from .metrics import FidelityRow, column_values


def candidate_layer_sets(depth: int) -> list[tuple[int, ...]]:
    """Sensible EViT layer sets for a model of ``depth`` blocks: the paper's 4,7,10 scaled to the
    depth, and evenly spaced sets of 2 to 4 layers that leave the first block alone."""
    sets = {tuple(sorted({max(2, min(depth, round(x * depth / 12))) for x in (4, 7, 10)}))}
    for n in (2, 3, 4):
        for start in (2, 3, 4):
            step = max(1, (depth - start) // n)
            s = tuple(start + i * step for i in range(n))
            if s[-1] <= depth:
                sets.add(s)
    return sorted(sets)


def search(model: nn.Module, *, target_gmacs: float | None = None, target_speedup: float | None = None,
           layer_sets: list[tuple[int, ...]] | None = None, batch: int = 64, reps: int = 3, device: str = "cpu",
           progress=None) -> dict:
    """The largest keep rate (and layer set) that meets a GMACs or a measured-speedup target.

    ``progress``: an :class:`evit_cli.utils.progress.Progress` to show the candidates tried on."""

    if (target_gmacs is None) == (target_speedup is None):
        raise EvitError("give one target: --target-gmacs or --target-speedup")
    optional(positive)("--target-gmacs", target_gmacs)
    optional(positive)("--target-speedup", target_speedup)
    cfg = get_config(model)
    searched = bool(layer_sets)
    layer_sets = layer_sets or [cfg.layers]
    adapter = adapters.get_adapter(model)
    best = None
    for layers in (progress or Progress(enabled=False)).track(layer_sets, "search", unit="layer sets"):
        m = copy.deepcopy(model)
        convert_module(m, keep_rate=1.0, layers=layers, **reorganized_as(cfg))
        if target_gmacs is not None:
            try:
                rate = largest_keep_rate_under(m, target_gmacs * 1e9, step=0.01)
            except EvitError:
                continue
        else:
            rate = _search_speedup(m, target_speedup, batch=batch, reps=reps, device=device)
            if rate is None:
                continue
        if best is None or rate > best[0]:
            best = (rate, layers)
    if best is None:
        where = "at any of the layer sets tried" if searched else "at these layers"
        if target_gmacs is not None:
            advice = "raise the target or choose earlier layers" + ("" if searched
                                                                    else " (--search-layers tries other sets)")
            raise EvitError(f"no keep rate reaches {target_gmacs:g} GMACs {where}: {advice}")
        advice = "lower the target or choose earlier layers" + ("" if searched
                                                                else " (--search-layers tries other sets)")
        raise EvitError(f"no keep rate reaches a {target_speedup:g}x speedup {where}: {advice}")
    rate, layers = best
    convert_module(model, keep_rate=rate, layers=layers, **reorganized_as(cfg))
    img = adapter.img_size(model)
    dense = dense_copy(model).to(device).eval()
    model.to(device).eval()
    x = torch.randn(batch, 3, img, img, device=device)
    med = median_times({"dense": dense, "evit": model}, x, reps=reps)
    return {
        "keep_rate": rate, "layers": list(layers), "fuse": cfg.fuse, "img_size": img,
        "gmacs": count_macs(model, img, device) / 1e9, "gmacs_dense": count_macs(dense, img, device) / 1e9,
        "speedup": med["dense"] / med["evit"], "images_per_s": batch / med["evit"], "batch": batch,
        "target_gmacs": target_gmacs, "target_speedup": target_speedup,
    }


def search_fidelity(model: nn.Module, data, *, limit: int, batch: int, workers: int, device) -> dict:
    """Fidelity to the dense model (and accuracy with labels) of a found setting, on ``limit`` images:
    agreement and KL, or for an embedding model cosine and neighbour overlap; top-1 or kNN top-1."""
    dense = dense_copy(model).to(device).eval()
    rows = Evaluator(dense, data).run({"dense": dense, "evit": model.to(device).eval()}, batch_size=batch,
                                      workers=workers, limit=limit, device=device)
    return {**rows["evit"].to_dict(), **{f"{k}_dense": v for k, v in rows["dense"].to_dict().items()
                                         if k in ("top1", "knn_top1")}}


def _search_speedup(model, target: float, *, batch: int, reps: int, device: str) -> float | None:
    """Bisection over keep rates 0.05-1.0 (steps of 0.05) on the measured speedup."""
    img = adapters.get_adapter(model).img_size(model)
    dense = dense_copy(model).to(device).eval()
    model.to(device).eval()
    x = torch.randn(batch, 3, img, img, device=device)
    cfg = get_config(model)

    def speedup(rate: float) -> float:
        adapters.set_keep_rates(model, [rate] * len(cfg.layers))
        med = median_times({"dense": dense, "evit": model}, x, reps=reps)
        return med["dense"] / med["evit"]

    lo, hi = 1, 20  # in units of 0.05
    if speedup(lo * 0.05) < target:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if speedup(mid * 0.05) >= target:
            lo = mid
        else:
            hi = mid
    return round(lo * 0.05, 2)



GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # the paper's range, and a little below


def calibration_sample(model: nn.Module, data, limit: int, *,
                       workers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluator's seeded sample of ``limit`` images (the model's eval transform), decoded once,
    and their labels: in the model's classes, or for an embedding model the data set's own."""
    xs, ys = zip(*Evaluator(model, data).batches(batch_size=64, workers=workers, limit=limit))
    return torch.cat(xs), (torch.cat(ys) if data.labelled else None)


class Scorer:
    """Fidelity of keep-rate settings of one model on a fixed sample, each setting evaluated once:
    the measures of :data:`~.metrics.COLUMNS` (top-1 None for a classifier without labels)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None, batch: int, device):
        self.model, self.images, self.targets, self.batch, self.device = (model.to(device).eval(), images, targets,
                                                                          batch, device)
        self.embedding = is_embedding(model)
        self.img = adapters.get_adapter(model).img_size(model)
        self.ref = self._outputs(dense_copy(model).to(device).eval())
        self.cache: dict[tuple, dict] = {}

    @torch.no_grad()
    def _outputs(self, m: nn.Module) -> torch.Tensor:
        return torch.cat([outputs(m, self.images[i:i + self.batch].to(self.device)).cpu()
                          for i in range(0, len(self.images), self.batch)])

    def divergence(self, r: dict) -> float:
        """What a move costs: KL(dense || EViT) of a classifier, 1 - cosine of an embedding model."""
        return 1 - r["cosine"] if self.embedding else r["kl"]

    def __call__(self, rates: tuple[float, ...]) -> dict:
        if rates not in self.cache:
            adapters.set_keep_rates(self.model, rates)
            tally = Tally(self.embedding)
            tally.add(self._outputs(self.model), self.ref, self.targets)
            r = FidelityRow.from_dict("setting", tally.result()).metrics()
            if not self.embedding:
                r.setdefault("top1", None)
            self.cache[rates] = {"keep_rates": list(rates),
                                 "gmacs": count_macs(self.model, self.img, self.device) / 1e9, **r}
        return self.cache[rates]


def constraint(max_drop: float | None, min_agreement: float | None, min_cosine: float | None, dense: dict):
    """Whether a scored setting keeps the constraint, and the constraint in words."""
    if max_drop is not None:
        return (lambda r: dense["top1"] - r["top1"] <= max_drop + 1e-9), f"top-1 drop <= {max_drop:g} points"
    if min_cosine is not None:
        return (lambda r: r["cosine"] >= min_cosine - 1e-9), f"cosine >= {min_cosine:g}"
    return (lambda r: r["agreement"] >= min_agreement - 1e-9), f"agreement >= {min_agreement:g}%"


def greedy(score: Scorer, n: int, ok) -> dict:
    """Lower one layer's rate a grid step at a time, cheapest divergence per MAC saved first, while ``ok``."""
    idx = [0] * n  # grid positions
    cur = score(tuple(GRID[i] for i in idx))
    while True:
        best = None
        for j in range(n):
            if idx[j] + 1 >= len(GRID):
                continue
            trial = idx.copy()
            trial[j] += 1
            r = score(tuple(GRID[i] for i in trial))
            saved = cur["gmacs"] - r["gmacs"]
            if saved <= 0 or not ok(r):
                continue
            cost = (score.divergence(r) - score.divergence(cur)) / saved
            if best is None or cost < best[0]:
                best = (cost, trial, r)
        if best is None:
            return cur
        _, idx, cur = best


def best_single_rate(score: Scorer, n: int, ok, step: float = 0.05) -> dict | None:
    """The lowest single keep rate (multiples of ``step``, down to the grid's lowest) that keeps the
    constraint, scanning down from 1."""
    found = None
    for k in range(round(1 / step) - 1, round(GRID[-1] / step) - 1, -1):
        r = score((round(k * step, 6),) * n)
        if not ok(r):
            break
        found = r
    return found


def _check_constraint(model: nn.Module, data, max_drop, min_agreement, min_cosine, limit: int) -> None:
    """One constraint, one that fits the model (classes or an embedding) and the data, in one line."""
    given = [c for c in (max_drop, min_agreement, min_cosine) if c is not None]
    if len(given) != 1:
        raise EvitError("give one constraint: --max-drop (points of top-1, needs labels), --min-agreement (%) "
                        "or, for a headless model, --min-cosine")
    if is_embedding(model) and min_cosine is None:
        raise EvitError("the model is headless (its output is an embedding, not classes): constrain it with "
                        "--min-cosine (cosine to the dense embedding)")
    if not is_embedding(model) and min_cosine is not None:
        raise EvitError("--min-cosine is for headless (embedding) models and this one is a classifier: use "
                        "--min-agreement or --max-drop")
    if min_cosine is not None:
        unit_interval("--min-cosine", min_cosine)
    if max_drop is not None and not data.labelled:
        raise EvitError("--max-drop needs labels and this data set has none: use --min-agreement instead")
    if limit < 1:
        raise EvitError(f"--limit must be at least 1, got {limit}")


def _as_method(cfg, method: str) -> dict:
    """:func:`reorganized_as` ``cfg``, with ``method`` (its own proportional attention when it changes)."""
    kw = reorganized_as(cfg)
    if method != cfg.method:
        kw.update(method=method, proportional_attention=None)
    return kw


def _methods_to_try(model: nn.Module, methods) -> tuple[str, ...]:
    """``methods`` checked, or by default every method the model takes (the paper's alone with --no-fuse)."""
    if methods:
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise EvitError(f"method {bad[0]!r} is not one of {', '.join(METHODS)}")
        return tuple(methods)
    return METHODS if get_config(model).fuse else ("evit",)


def _greedy_for(model, method, positions, sample, ok_of, batch, device):
    """The greedy search with ``method`` at ``positions`` on ``sample`` (images, targets): (dense row, found,
    evaluations, ok), or None when the model cannot take the method."""
    m = copy.deepcopy(model)
    try:
        convert_module(m, keep_rate=1.0, layers=positions, **_as_method(get_config(model), method))
    except EvitError:
        return None
    score = Scorer(m, *sample, batch, device)
    dense = score((1.0,) * len(positions))
    ok, words = ok_of(dense)
    return dense, greedy(score, len(positions), ok), len(score.cache), ok, words


def search_by_accuracy(model: nn.Module, data, *, max_drop: float | None = None, min_agreement: float | None = None,
                       min_cosine: float | None = None, limit: int = 256, search_layers: bool = False, batch: int = 64,
                       device="cpu", workers: int = 0, methods: tuple[str, ...] | None = None) -> dict:
    """The configuration with the fewest counted MACs found within the constraint (see the module), over
    ``methods`` (default: the paper's and the squeeze, where the model takes it)."""
    _check_constraint(model, data, max_drop, min_agreement, min_cosine, limit)
    cfg = get_config(model)
    depth = adapters.get_adapter(model).depth(model)
    positions = tuple(range(2, depth + 1)) if search_layers else tuple(cfg.layers)
    sample = calibration_sample(model, data, limit, workers=workers)
    tried = {}
    for method in _methods_to_try(model, methods):
        run = _greedy_for(model, method, positions, sample, lambda d: constraint(max_drop, min_agreement,
                                                                                  min_cosine, d), batch, device)
        if run is not None and any(r < 1.0 for r in run[1]["keep_rates"]):
            tried[method] = run
    if not tried:
        raise EvitError(f"no keep rate below 1.0 keeps the constraint on these {len(sample[0])} images: loosen it")
    method = min(tried, key=lambda k: tried[k][1]["gmacs"])
    dense, found, evaluations, ok, words = tried[method]
    kept = [(p, r) for p, r in zip(positions, found["keep_rates"]) if r < 1.0]
    single_layers = tuple(p for p, _ in kept) if not search_layers else tuple(cfg.layers)
    single = _single_baseline(model, single_layers, *sample, batch, device, ok, found["gmacs"], method)
    accuracy = {f"{k}_dense": dense[k] for k in ("top1", "knn_top1") if k in dense}
    return {
        "layers": [p for p, _ in kept], "keep_rates": [r for _, r in kept], "fuse": cfg.fuse, "method": method,
        "gmacs": found["gmacs"], "gmacs_dense": dense["gmacs"], **column_values(found),
        **accuracy, "constraint": words, "calibration_images": len(sample[0]), "evaluations": evaluations,
        "methods": {k: {"gmacs": v[1]["gmacs"], **column_values(v[1])} for k, v in tried.items()},
        "single_rate": single,
    }


def _single_baseline(model, layers, images, targets, batch, device, ok, gmacs: float, method: str) -> dict:
    """For comparison, at ``layers`` with ``method``: the best single keep rate within the same constraint,
    and the largest single keep rate whose counted MACs do not exceed ``gmacs`` (the per-layer result's)."""
    m = copy.deepcopy(model)
    convert_module(m, keep_rate=1.0, layers=layers, **_as_method(get_config(model), method))
    score = Scorer(m, images, targets, batch, device)
    n = len(layers)

    def row(r):
        if r is None:
            return None
        return {"keep_rate": r["keep_rates"][0], "gmacs": r["gmacs"], **column_values(r), "meets": ok(r)}

    try:
        equal = score((largest_keep_rate_under(m, gmacs * 1e9 + 0.5, step=0.01),) * n)
    except EvitError:  # no single rate gets that cheap at these layers
        equal = None
    return {"layers": list(layers), "within_constraint": row(best_single_rate(score, n, ok)),
            "at_equal_gmacs": row(equal)}


def reproduce_command(model: str, result: dict, *, pretrained: bool | None = None,
                      checkpoint: str | os.PathLike | None = None, score: str | None = None,
                      restore: str | None = None) -> str:
    """The `evit convert` command line that builds the setting a search found for ``model`` (with the
    ``score`` and ``restore`` the search was given)."""
    rates = result.get("keep_rates") or [result["keep_rate"]]
    parts = ["evit convert", shlex.quote(str(model)), "--keep-rate " + ",".join(f"{r:g}" for r in rates),
             "--layers " + ",".join(map(str, result["layers"]))]
    if pretrained is False:
        parts.append("--no-pretrained")
    if checkpoint:
        parts.append(f"--checkpoint {shlex.quote(str(checkpoint))}")
    if not result["fuse"]:
        parts.append("--no-fuse")
    if result.get("method", "evit") != "evit":
        parts.append(f"--method {result['method']}")
    parts += [f"--{name} {shlex.quote(value)}" for name, value in (("score", score), ("restore", restore)) if value]
    return " ".join(parts)
