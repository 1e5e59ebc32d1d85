"""`evit eval` and `evit sweep`: the EViT model against the dense one, at one keep rate or many."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..algorithm.config import parse_keep_rates
from ..io import loading
from ..measure.evaluate import evaluate as run_eval
from ..measure.report import eval_table, sweep_markdown, sweep_table
from ..measure.sweep import plot_sweep
from ..measure.sweep import sweep as run_sweep
from ..utils.device import resolve_device
from ..utils.files import check_report_dir, write_json, write_text
from ..utils.progress import Progress
from . import options as o
from .render import emit

EVAL_EXAMPLE = "Example: evit eval deit_t_evit --dataset ../shared/real/imagenette-val --json"
SWEEP_EXAMPLE = ("Example: evit sweep deit_small_patch16_224 --no-pretrained --keep-rates 0.5,0.6,0.7,0.8,0.9,1.0 "
                 "-o sweep/")

EvalModel = o.model_argument("Exported folder, or a model `evit convert` takes (converted with -k/-l).")
EvalDataset = o.dataset("Hub name, image folder, save_to_disk folder or parquet.", required=True)
EvalBatch = o.batch("Batch size for evaluation and throughput.")
EvalReps = o.reps("Timed passes per model for throughput.")
EvalReport = o.report("Write eval.json into this folder.")
Reference = Annotated[Optional[str], typer.Option(
    "--reference", help="The dense model to compare with (name, hub id or folder). [default: for a fine-tuned folder "
    "the dense model it started from, else the model's own weights with EViT off]", show_default=False)]

SweepModel = o.model_argument("A model `evit convert` takes, or an exported folder (its layers are used).")
KeepRates = Annotated[str, typer.Option("--keep-rates", callback=o.KEEP_RATES, help="Keep rates to compare.")]
SweepDataset = o.dataset("Also measure accuracy on this data set.")
SweepBatch = o.batch("Batch size for timing and evaluation.")
SweepReps = o.reps("Timed passes per model.")
SweepOutput = o.output("Folder for sweep.json, sweep.md and sweep.png.", kind=Path)


def evaluate(
    model: EvalModel, dataset: EvalDataset, split: o.Split = None, keep_rate: o.KeepRate = None,
    layers: o.Layers = None, method: o.Method = None, pretrained: o.Pretrained = None, checkpoint: o.Checkpoint = None,
    batch: EvalBatch = 64, limit: o.Limit = None, workers: o.Workers = 2, image_column: o.ImageColumn = None,
    label_column: o.LabelColumn = None, device: o.Device = "cpu", reps: EvalReps = 5, report: EvalReport = None,
    reference: Reference = None, skip_bad_images: o.SkipBadImages = False, as_json: o.AsJson = False,
    score: o.Score = None, restore: o.Restore = None,
):
    """Dense vs EViT on the same images: agreement and KL(dense || EViT) on any image folder, top-1/top-5
    with labels, throughput.

    A flat folder of images has no labels. ImageNet synset folder names (n01440764, ...) map to a
    1000-class model's classes. A headless model reports the cosine similarity of the embeddings.
    """
    if report is not None:
        check_report_dir(report)
    resolve_device(device)
    m = loading.load_converted(model, keep_rate, layers, pretrained=pretrained, checkpoint=checkpoint, method=method,
                                score=score, restore=restore)
    result = run_eval(m, dataset, reference=reference, split=split, limit=limit, batch=batch, workers=workers,
                      device=device, reps=reps, image_column=image_column, label_column=label_column,
                      skip_bad_images=skip_bad_images, progress=True).to_dict()
    if report is not None:
        result["report_files"] = [str(write_json(Path(report) / "eval.json", result))]
    emit(result, as_json, eval_table(result))


def sweep(
    model: SweepModel, keep_rates: KeepRates = "0.5,0.6,0.7,0.8,0.9,1.0", layers: o.Layers = None,
    dataset: SweepDataset = None, split: o.Split = None, limit: o.Limit = None, pretrained: o.Pretrained = None,
    checkpoint: o.Checkpoint = None, batch: SweepBatch = 64, reps: SweepReps = 5, device: o.Device = "cpu",
    workers: o.Workers = 2, output: SweepOutput = Path("sweep"), skip_bad_images: o.SkipBadImages = False,
    as_json: o.AsJson = False, score: o.Score = None, restore: o.Restore = None,
):
    """For each keep rate: GMACs, images/s, speedup (timed side by side), accuracy with --dataset; table,
    JSON, PNG plot."""
    check_report_dir(output)
    resolve_device(device)
    m = loading.load_converted(model, 1.0, layers, pretrained=pretrained, checkpoint=checkpoint, score=score,
                               restore=restore)
    with Progress() as p:
        result = run_sweep(m, list(parse_keep_rates(keep_rates)), dataset=dataset, split=split, batch=batch, reps=reps,
                           device=device, limit=limit, workers=workers, progress=p, skip_bad_images=skip_bad_images)
    result["model"] = loading.source_name(m, model)
    files = [write_json(output / "sweep.json", result), write_text(output / "sweep.md", sweep_markdown(result)),
             plot_sweep(result, output / "sweep.png", f"{result['model']}: EViT keep-rate sweep")]
    result["report_files"] = [str(f) for f in files]
    emit(result, as_json, sweep_table(result))
