"""`evit finetune`: train the EViT model on a data set (flags over a recipe over the defaults), then
benchmark it.

Its options are the fields of :class:`evit_cli.train.TrainConfig` (help, check, flags and default
declared there, once), plus the few that only the command has: --recipe, --skip-bad-images, --json.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EvitError
from ..io import loading
from ..io.images import BadImages
from ..measure.bench import bench
from ..measure.report import kv_table, write_bench
from ..train import TrainConfig, load_recipe
from ..train.checkpoint import CHECKPOINT
from ..train.loop import train
from ..train.resume import run_folders
from ..utils.files import check_writable
from . import options as o
from .render import emit, err

EXAMPLE = "Example: evit finetune deit_t_evit --dataset ./my_photos --epochs 1 -o deit_t_recovered"
COMMAND_ONLY = ("recipe", "skip_bad_images", "as_json")


def finetune(**flags):
    """Fine-tune the EViT model on a data set with the cosine keep-rate schedule.

    The defaults are the recovery recipe (recipes/recover.yaml): function matching with the dense model before
    conversion (teacher and student see the same random-resized, flipped, mixup/CutMix-mixed images; MSE on all
    the logits and on the pre-logits features, or cosine on an embedding model's embedding and MSE on its class
    token after every layer), AdamW lr 5e-5, weight decay 0.05, batch 32, cosine, 2 epochs (4 for an embedding
    model). Labels are optional (a flat folder of photos), for classifiers and headless embedding models; what it
    wins on images it never saw is measured in the README. The old recovery: --distill-loss kl --mixup 0
    --distill-features 0 --cutmix 0. A recipe (recipes/) sets any of the options below by name (batch_size: 64);
    a flag given with it wins (--recipe recipes/deit_small.yaml --keep-rate 0.5).

    Under torchrun (torchrun --nproc_per_node 8 -m evit_cli finetune ...) it trains data-parallel.
    """
    recipe, skip_bad_images, as_json = (flags.pop(k) for k in COMMAND_ONLY)
    cfg = _config(flags, recipe)
    bad = BadImages(bool(skip_bad_images))
    result = _removing_if_unresumable(cfg, lambda: finetune_and_bench(cfg, console=err, bad_images=bad))
    if skip_bad_images:
        result["skipped_images"] = bad.count
    if int(os.environ.get("RANK", "0")) == 0:
        emit(result, bool(as_json), kv_table(f"fine-tuned -> {cfg.output}", result))


Recipe = typer.Option("--recipe", help="YAML recipe (see recipes/): option names as keys; flags override it.",
                      show_default=False, rich_help_panel="The run")
AsJson = typer.Option("--json", help="Print the final metrics as JSON on stdout.", rich_help_panel="The run")
SkipBadImages = typer.Option("--skip-bad-images", help=o.SKIP_HELP, rich_help_panel="Data")


def _parameters() -> list[inspect.Parameter]:
    """The command's parameters: every TrainConfig field's, --recipe after -o, and the command's own."""
    fields = o.config_parameters(TrainConfig)
    at = next(i for i, p in enumerate(fields) if p.name == "output") + 1

    def own(name, kind, info, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[kind, info])

    return [*fields[:at], own("recipe", Optional[Path], Recipe, None), *fields[at:],
            own("skip_bad_images", bool, SkipBadImages, False), own("as_json", bool, AsJson, False)]


o.with_parameters(finetune, _parameters())


def finetune_and_bench(cfg: TrainConfig, console=None, bad_images=None) -> dict:
    """What the command runs: the fine-tune (:func:`evit_cli.train.finetune`), then, with
    ``cfg.bench`` and on the main process, the benchmark of the trained model written into the
    output folder (bench.json, bench.md). Returns the final metrics."""
    trained = train(cfg, console, bad_images)
    if cfg.bench and int(os.environ.get("RANK", "0")) == 0:
        report = bench(trained.model, batch=cfg.bench_batch, device=trained.device.type, reps=5, warmup=1,
                       progress=console is not None)
        write_bench(report, Path(cfg.output))
    return trained.metrics


def _config(flags: dict, recipe: Optional[Path]) -> TrainConfig:
    """The run's settings, checked: the flags given over the recipe over the defaults."""
    cfg = TrainConfig.merged(load_recipe(recipe) if recipe else None, flags)
    if cfg.lr is not None and cfg.min_lr > cfg.lr:  # the library clamps it; a user who typed both is asked
        raise EvitError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}: lower --min-lr")
    if not cfg.model:
        raise EvitError("no model: give MODEL or a --recipe that names one")
    loading.pretrained_flag(cfg.model, flags["pretrained"])
    if not cfg.dataset:
        raise EvitError("no data set: give --dataset (a hub name, an image folder, a save_to_disk folder or parquet)")
    if not cfg.output:
        raise EvitError("no output folder: give -o/--output")
    _check_run_folder(Path(cfg.output))
    return cfg


def _check_run_folder(output: Path) -> None:
    """A training output folder: a folder (or nothing yet) in a place we can write to."""
    if output.exists() and not output.is_dir():
        raise EvitError(f"output {output} exists and is not a folder: choose another -o")
    check_writable(output if output.is_dir() else output.parent)


def _removing_if_unresumable(cfg: TrainConfig, work):
    """Run ``work``; if it fails before the first checkpoint, remove the folders it created
    (nothing there could be resumed), so that a failed start leaves nothing behind."""
    output, train_dir = run_folders(cfg)
    created = [p for p in (output, train_dir) if not p.exists()]
    try:
        return work()
    except BaseException:
        if not (train_dir / CHECKPOINT).is_file():
            for p in created:
                shutil.rmtree(p, ignore_errors=True)
        raise
