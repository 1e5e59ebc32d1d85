"""`evit search`: the cheapest EViT setting that meets a target, and the command that builds it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import adapters
from ..algorithm.config import METHODS
from ..errors import EvitError
from ..io import loading
from ..measure.evaluate import load_eval_data
from ..measure.report import kv_table
from ..measure.search import candidate_layer_sets, reproduce_command, search_by_accuracy, search_fidelity
from ..measure.search import search as run
from ..model import validate
from ..utils.device import resolve_device
from ..utils.progress import Progress
from . import options as o
from .render import emit, out, without

EXAMPLE = "Example: evit search deit_small_patch16_224 --no-pretrained --target-gmacs 3.0 --search-layers"

Model = o.model_argument("A model `evit convert` takes, or an exported folder.")
TargetGmacs = Annotated[Optional[float], typer.Option("--target-gmacs", callback=o.POSITIVE,
                                                      help="Counted GMACs per image to stay within.")]
TargetSpeedup = Annotated[Optional[float], typer.Option("--target-speedup", callback=o.POSITIVE,
                                                        help="Measured speedup over dense to reach.")]
SearchLayers = Annotated[bool, typer.Option(
    "--search-layers", help="Also choose among sensible layer sets (by accuracy: any block from 2 on).")]
Dataset = o.dataset("Images for --max-drop/--min-agreement/--min-cosine (labelled or a flat folder); with a "
                    "GMACs/speedup target, the found setting's fidelity on them.")
MaxDrop = Annotated[Optional[float], typer.Option(
    "--max-drop", callback=o.NON_NEGATIVE,
    help="Fastest setting whose top-1 stays within this many points of the dense model's (needs labels).")]
MinAgreement = Annotated[Optional[float], typer.Option(
    "--min-agreement", callback=o.PERCENT,
    help="Fastest setting that agrees with the dense model's top-1 on at least this % of images "
         "(no labels needed).")]
MinCosine = Annotated[Optional[float], typer.Option(
    "--min-cosine", callback=o.checked(validate.unit_interval),
    help="Headless (embedding) models: fastest setting whose embeddings keep at least this mean cosine to the "
         "dense model's (no labels needed).")]
SearchMethod = Annotated[Optional[str], typer.Option(
    "--method", callback=o.checked(validate.one_of(*METHODS)), show_default=False,
    help="Search this method only. [default: with an accuracy constraint, both evit and squeeze (the cheaper "
         "within it wins); with a GMACs/speedup target, evit, or an exported folder's own]")]
Limit = Annotated[int, typer.Option("--limit", callback=o.POSITIVE_INT,
                                    help="Calibration sample: this many images (seeded).")]
Batch = o.batch("Batch for timing.")
Reps = o.reps("Timed passes per model and candidate.")


def _check_goal(target_gmacs, target_speedup, constraints, dataset, layers, search_layers) -> None:
    """One goal, and what it needs: an accuracy constraint with images, or one GMACs/speedup target."""
    given = sum(c is not None for c in constraints)
    if given and (target_gmacs is not None or target_speedup is not None):
        raise EvitError("give an accuracy constraint or a GMACs/speedup target, not both")
    if given > 1:
        raise EvitError("give one accuracy constraint: --max-drop (labels), --min-agreement or --min-cosine "
                        "(no labels needed)")
    if not given and (target_gmacs is None) == (target_speedup is None):
        raise EvitError("give one target: --target-gmacs or --target-speedup "
                        "(or --max-drop/--min-agreement/--min-cosine with --dataset)")
    if given and dataset is None:
        raise EvitError("--max-drop/--min-agreement/--min-cosine need --dataset: the images to measure on")
    if search_layers and layers:
        raise EvitError("--search-layers chooses the layers: drop --layers, or drop --search-layers")


def search(
    model: Model, target_gmacs: TargetGmacs = None, target_speedup: TargetSpeedup = None, layers: o.Layers = None,
    search_layers: SearchLayers = False, dataset: Dataset = None, split: o.Split = None, max_drop: MaxDrop = None,
    min_agreement: MinAgreement = None, min_cosine: MinCosine = None, limit: Limit = 256, workers: o.Workers = 2,
    method: SearchMethod = None, pretrained: o.Pretrained = None,
    checkpoint: o.Checkpoint = None, batch: Batch = 64, reps: Reps = 3, device: o.Device = "cpu",
    as_json: o.AsJson = False, score: o.Score = None, restore: o.Restore = None,
):
    """The cheapest EViT setting that meets a target, and the convert command for it.

    --target-gmacs/--target-speedup: the largest keep rate (and layer set). --max-drop/--min-agreement
    (--min-cosine for a headless model) with --dataset: layer set and per-layer keep rates, by a greedy search
    on counted GMACs within the accuracy constraint.
    """
    constraints = (max_drop, min_agreement, min_cosine)
    _check_goal(target_gmacs, target_speedup, constraints, dataset, layers, search_layers)
    resolve_device(device)
    m = loading.load_converted(model, 1.0, layers, pretrained=pretrained, checkpoint=checkpoint, method=method,
                               score=score, restore=restore)
    data = load_eval_data(dataset, split) if dataset else None
    if any(c is not None for c in constraints):
        result = search_by_accuracy(m, data, max_drop=max_drop, min_agreement=min_agreement, min_cosine=min_cosine,
                                    limit=limit, search_layers=search_layers, batch=batch, device=device,
                                    workers=workers, methods=(method,) if method else None)
    else:
        sets = candidate_layer_sets(adapters.get_adapter(m).depth(m)) if search_layers else None
        with Progress() as p:
            result = run(m, target_gmacs=target_gmacs, target_speedup=target_speedup, layer_sets=sets, batch=batch,
                         reps=reps, device=device, progress=p)
        if data is not None:
            result["fidelity"] = search_fidelity(m, data, limit=limit, batch=batch, workers=workers, device=device)
    result["model"] = loading.source_name(m, model)
    result["command"] = reproduce_command(model, result, pretrained=pretrained, checkpoint=checkpoint,
                                          score=score, restore=restore)
    emit(result, as_json, kv_table("evit search", without(result, "command")))
    if not as_json:
        out.print(f"\nReproduce with:\n  {result['command']}", soft_wrap=True)
