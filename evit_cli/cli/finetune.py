"""`evit finetune`: train the EViT model on a data set (flags over a recipe over the defaults)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EvitError
from ..io import loading
from ..io.data import BadImages
from ..measure.report import kv_table
from ..model import validate
from ..train.checkpoint import CHECKPOINT
from ..train.run import TrainConfig, load_recipe, run_folders
from ..train.run import finetune as run
from ..utils.files import check_writable
from . import options as o
from .render import emit, err

EXAMPLE = "Example: evit finetune deit_t_evit --dataset ./my_photos --epochs 1 -o deit_t_recovered"


def _flag(kind, *decls: str, help: str):
    """An option with no default of its own: the recipe's, else the training defaults, apply."""
    return Annotated[Optional[kind], typer.Option(*decls, help=help, show_default=False)]


def _checked(kind, name: str, help: str, *short: str):
    """A finetune option named after its recipe key, checked as the recipe's value would be."""
    flag = "--" + name.replace("_", "-")
    return Annotated[Optional[kind], typer.Option(flag, *short, callback=o.train_check(name), help=help)]


Model = Annotated[Optional[str], typer.Argument(
    help="Anything `evit convert` takes, or an exported folder. [default: the recipe's]", show_default=False)]
Dataset = o.dataset("Hub name, image folder (class per subfolder), save_to_disk folder, or parquet.")
Output = o.output("Output folder: checkpoints while training, the exported model at the end.", kind=Optional[str])
Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="YAML recipe (see recipes/); flags override it.")]
KeepRate, Layers = o.keep_rate(o.MODEL_OWN), o.layers(o.MODEL_OWN)
Fuse = o.fuse("Fuse or drop the inattentive tokens.")
Pretrained = o.pretrained("Start from pretrained weights. [default: pretrained]")
Checkpoint = o.checkpoint("Local weights for MODEL.", kind=str)
Head = _checked(str, "head", "auto: keep the model's head when the data set's classes map onto its classes (ImageNet "
                "synset folders onto a 1000-class model, names in id2label) or there are no labels, else a new one; "
                "a headless model stays headless (its embedding is distilled, labels score kNN top-1); keep; new. "
                "[default: auto]")
NumClasses = _checked(int, "num_classes", "Classifier size; 0: headless, the embedding (timm models; a "
                      "checkpoint's head is dropped). Not for an exported folder. [default: the model's or the "
                      "checkpoint's]")
ImgSize = _checked(int, "img_size", "Train and export at this resolution (position embeddings interpolated).")
TrainSplit = Annotated[Optional[str], typer.Option("--train-split", help="[default: train]")]
ValSplit = Annotated[Optional[str], typer.Option(
    "--val-split", help="[default: validation/val/test if present, else carved from train]")]
ValFraction = _checked(float, "val_fraction",
                       "Share of train held out (seeded) when there is no validation split. [default: 0.1]")
Streaming = _flag(bool, "--streaming/--no-streaming", help="Stream the data set instead of memory-mapping it.")
StepsPerEpoch = _checked(int, "steps_per_epoch", "Optimizer steps per epoch (needed with --streaming).")
Workers = _checked(int, "workers", "DataLoader workers per process. [default: 2]")
RandAugment = _checked(str, "randaugment", "timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1. "
                       "[default: off: random-resized crop and flip only]")
ColorJitter = _checked(float, "color_jitter", "[default: 0]")
Mixup = _checked(float, "mixup", "Mixup alpha (0 = off); the teacher sees the same mixed images. [default: 1.0]")
CutMix = _checked(float, "cutmix", "CutMix alpha (0 = off); with mixup on, one of the two per batch. [default: 1.0]")
Smoothing = _checked(float, "smoothing", "Label smoothing of the label term (none without labels). [default: 0.1]")
Epochs = _checked(float, "epochs", "[default: 2, and 4 for an embedding model (no classification head)]")
BatchSize = _checked(int, "batch_size", "Per process. [default: 32]", "-b")
Lr = _checked(float, "lr", "Peak learning rate. [default: 5e-5, or --lr-per-512 x global batch / 512]")
LrPer512 = _checked(float, "lr_per_512",
                    "Learning rate per 512 images of global batch (the paper's recipes: 2e-5).")
MinLr = _checked(float, "min_lr", "End of the cosine; clamped to the peak. [default: 1e-6]")
WeightDecay = _checked(float, "weight_decay", "[default: 0.05]")
WarmupEpochs = _checked(float, "warmup_epochs", "Learning-rate warm-up. [default: 0]")
ClipGrad = _checked(float, "clip_grad", "Gradient norm clipping (off by default).")
AccumSteps = _checked(int, "accum_steps", "Gradient accumulation. [default: 1]")
Amp = _flag(bool, "--amp/--no-amp", help="Mixed precision (bf16 where supported, else fp16).")
Seed = _checked(int, "seed", "[default: 0]")
Device = _checked(str, "device", "[default: cuda when available, else cpu]")
ShrinkStart = _checked(float, "shrink_start", "Epochs at keep rate 1.0 first. [default: 0]")
ShrinkEpochs = _checked(float, "shrink_epochs", "Epochs of cosine from 1.0 to the target. [default: 0]")
Distill = _flag(bool, "--distill/--no-distill",
                help="Distil from the dense model before conversion (its output: logits, or an embedding). "
                     "[default: whenever its classes fit; always without labels]")
Teacher = Annotated[Optional[str], typer.Option("--teacher", help="Another teacher model (implies --distill).")]
Oracle = _flag(bool, "--oracle/--no-oracle",
               help="While training, keep the tokens the teacher's class attention ranks highest (the paper's "
                    "oracle; the teacher: --teacher, or the dense model before conversion). At inference the model "
                    "chooses by its own attention. [default: no-oracle]")
DistillLoss = _checked(str, "distill_loss", "auto: MSE on all the logits of a classifier, 1 - cosine + relative MSE "
                       "on an embedding model's embedding; mse; kl (at --distill-tau: the old recovery); cosine. "
                       "[default: auto]")
DistillAlpha = _checked(float, "distill_alpha", "Weight of the distillation term against the label term (without "
                        "labels it is the whole loss). [default: 0.5]")
DistillTau = _checked(float, "distill_tau", "Temperature of --distill-loss kl. [default: 1.0]")
DistillFeatures = _checked(float, "distill_features", "A classifier's feature term: this weight x the MSE between the "
                           "student's and the dense teacher's pre-logits features (the input of the head), added to "
                           "the logit term; 0: off. [default: 1.0]")
DistillLayers = _checked(float, "distill_layers", "The layer term: this weight x the MSE between the student's and "
                         "the dense teacher's class (prefix) tokens after every layer but the last, relative to the "
                         "teacher's mean square, averaged over layers; 0: off. [default: 1 for an embedding model, "
                         "0 for a classifier]")
SaveEvery = _checked(int, "save_every", "Also checkpoint every N optimizer steps. [default: end of epoch only]")
CheckpointDir = _checked(str, "checkpoint_dir",
                         "Where the training checkpoint goes. [default: OUTPUT.train, beside the export]")
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --output after a crash or a kill.")]
Overwrite = o.overwrite("Replace an existing output folder.")
Bench = _flag(bool, "--bench/--no-bench", help="Benchmark the trained model at the end. [default: bench]")
BenchBatch = _checked(int, "bench_batch", "[default: 32]")
AsJson = o.as_json("Print the final metrics as JSON on stdout.")


def finetune(
    model: Model = None, dataset: Dataset = None, output: Output = None, recipe: Recipe = None,
    keep_rate: KeepRate = None, layers: Layers = None, fuse: Fuse = None, pretrained: Pretrained = None,
    checkpoint: Checkpoint = None, num_classes: NumClasses = None, head: Head = None, img_size: ImgSize = None,
    train_split: TrainSplit = None, val_split: ValSplit = None, val_fraction: ValFraction = None,
    image_column: o.ImageColumn = None, label_column: o.LabelColumn = None, streaming: Streaming = None,
    steps_per_epoch: StepsPerEpoch = None, workers: Workers = None,
    randaugment: RandAugment = None, color_jitter: ColorJitter = None, mixup: Mixup = None, cutmix: CutMix = None,
    smoothing: Smoothing = None, epochs: Epochs = None, batch_size: BatchSize = None, lr: Lr = None,
    lr_per_512: LrPer512 = None, min_lr: MinLr = None, weight_decay: WeightDecay = None,
    warmup_epochs: WarmupEpochs = None, clip_grad: ClipGrad = None, accum_steps: AccumSteps = None, amp: Amp = None,
    seed: Seed = None, device: Device = None, shrink_start: ShrinkStart = None, shrink_epochs: ShrinkEpochs = None,
    distill: Distill = None, teacher: Teacher = None, oracle: Oracle = None, distill_loss: DistillLoss = None,
    distill_alpha: DistillAlpha = None, distill_features: DistillFeatures = None, distill_layers: DistillLayers = None,
    distill_tau: DistillTau = None, save_every: SaveEvery = None, checkpoint_dir: CheckpointDir = None,
    resume: Resume = False, overwrite: Overwrite = False, bench_report: Bench = None, bench_batch: BenchBatch = None,
    skip_bad_images: o.SkipBadImages = False, as_json: AsJson = False,
):
    """Fine-tune the EViT model on a data set with the cosine keep-rate schedule.

    The defaults are the recovery recipe (recipes/recover.yaml): function matching with the dense model before
    conversion (teacher and student see the same random-resized, flipped, mixup/CutMix-mixed images; MSE on all
    the logits and on the pre-logits features, or cosine on an embedding model's embedding and MSE on its class
    token after every layer), AdamW lr 5e-5, weight decay 0.05, batch 32, cosine, 2 epochs (4 for an embedding
    model). Labels are optional (a flat folder of photos), for classifiers and headless embedding models; what it
    wins on images it never saw is measured in the README. The old recovery: --distill-loss kl --mixup 0
    --distill-features 0 --cutmix 0.

    Under torchrun (torchrun --nproc_per_node 8 -m evit_cli finetune ...) it trains data-parallel.
    """
    flags = dict(locals())
    cfg = _config(flags, recipe)
    bad = BadImages(skip_bad_images)
    result = _removing_if_unresumable(cfg, lambda: run(cfg, console=err, bad_images=bad))
    if skip_bad_images:
        result["skipped_images"] = bad.count
    if int(os.environ.get("RANK", "0")) == 0:
        emit(result, as_json, kv_table(f"fine-tuned -> {cfg.output}", result))


def _config(flags: dict, recipe: Optional[Path]) -> TrainConfig:
    """The run's settings, checked: the flags given over the recipe over the defaults."""
    given = {k: v for k, v in flags.items() if k not in ("recipe", "as_json", "bench_report", "skip_bad_images")}
    given.update(bench=flags["bench_report"], resume=flags["resume"] or None, overwrite=flags["overwrite"] or None)
    cfg = TrainConfig.merged(load_recipe(recipe) if recipe else None, given)
    validate.train_config(cfg)
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
