"""Fine-tune an EViT model with the keep-rate schedule of docs/algorithm.md.

By default it distils the EViT model from the dense model it was made from: labels are optional
(a flat folder of photos is enough), the head is kept when the data set's classes map onto the
model's, and the settings are the recovery recipe of ``recipes/recover.yaml``.

Single process or data-parallel under ``torchrun`` (DDP; NCCL on GPUs, gloo
on CPU). Only rank 0 writes files and prints. The run can be killed at any
point and continued with ``resume=True``: checkpoints are atomic and carry the
optimizer, scaler, step and RNG states, the data order is a function of
(seed, epoch) and each image's augmentation of (seed, epoch, index), so a
resumed run takes the same steps an uninterrupted one does, with any number of
loader workers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import adapters
from ..algorithm.schedule import Schedule, steps_per_epoch
from ..algorithm.state import model_state
from ..errors import EvitError
from ..measure.fidelity import NEIGHBOURS
from ..model import validate
from ..model.convert import convert_keeping, dense_copy, get_config
from ..utils.device import amp_dtype, autocast, resolve_device
from ..utils.files import write_json
from . import checkpoint as ckpt

METRICS_LOG = "metrics.jsonl"
STEP_LOG = "train_log.jsonl"
CONFIG_FILE = "train_config.json"  # the run's settings, in the output folder
DEFAULT_LR = 5e-5  # recipes/recover.yaml: AdamW at batch 32 on a pretrained model


@dataclass
class TrainConfig:
    """Everything a run needs; recipes (YAML) and flags fill it. Epoch counts may be fractional.

    The defaults are the recovery recipe (recipes/recover.yaml): function matching with the dense
    model (teacher and student see the same random-resized, flipped, mixup/CutMix-mixed images; MSE
    on the logits, or cosine on an embedding), AdamW lr 5e-5, weight decay 0.05, batch 32, cosine, 2 epochs
    (an embedding model: 4).
    """

    model: str = ""
    dataset: str = ""
    output: str = ""
    keep_rate: object = None  # one rate or one per layer; None: the model's own, else 0.7
    layers: object = None  # 1-based; None: the model's own, else 4,7,10
    fuse: bool | None = None
    pretrained: bool = True
    checkpoint: str | None = None
    num_classes: int | None = None  # None: the model's or the checkpoint's; 0: headless (timm)
    head: str = "auto"  # auto | keep | new
    img_size: int | None = None
    # data
    train_split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.1
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool = False
    steps_per_epoch: int | None = None  # required when streaming
    workers: int = 2
    randaugment: str | None = None  # e.g. rand-m9-mstd0.5-inc1
    color_jitter: float = 0.0
    mixup: float = 1.0  # alpha; mixup and CutMix on: the teacher sees the same mixed images (function matching)
    cutmix: float = 1.0
    smoothing: float = 0.1  # label smoothing of the label term (there is none without labels)
    # optimisation
    epochs: float | None = None  # None: recovery_epochs() (2, an embedding model 4)
    batch_size: int = 32  # per process
    lr: float | None = None  # absolute; None: lr_per_512 * global batch / 512 if given, else 5e-5
    lr_per_512: float | None = None
    min_lr: float = 1e-6  # clamped to the peak
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    clip_grad: float | None = None
    accum_steps: int = 1
    amp: bool = False
    seed: int = 0
    device: str | None = None  # None: cuda when available
    # keep-rate schedule
    shrink_start: float = 0.0
    shrink_epochs: float = 0.0
    # distillation: None distils whenever the teacher's classes fit (always without labels)
    distill: bool | None = None
    teacher: str | None = None
    distill_loss: str = "auto"  # auto: MSE on the logits of a classifier, cosine for an embedding; mse, kl, cosine
    distill_alpha: float = 0.5  # weight of the distillation term when there are labels
    distill_tau: float = 1.0  # temperature of --distill-loss kl
    distill_features: float = 1.0  # weight of the MSE on the pre-logits features (classifiers; 0: off)
    distill_layers: float | None = None  # weight of the class-token term after each layer; None: by the output
    oracle: bool = False  # the teacher's class attention chooses the kept tokens while training
    # bookkeeping
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: end of epoch only
    checkpoint_dir: str | None = None  # None: OUTPUT.train beside the output
    resume: bool = False
    overwrite: bool = False
    bench: bool = True
    bench_batch: int = 32
    extra: dict = field(default_factory=dict)

    @classmethod
    def merged(cls, recipe: dict | None, flags: dict) -> TrainConfig:
        """Recipe values, overridden by every flag that was given (not None)."""
        names = {f.name for f in fields(cls)}
        recipe = {k.replace("-", "_"): v for k, v in (recipe or {}).items()}
        unknown = sorted(set(recipe) - names)
        if unknown:
            raise EvitError(f"unknown recipe keys {unknown}: see `evit finetune --help` for the names")
        values = {**recipe, **{k: v for k, v in flags.items() if v is not None}}
        return cls(**values)


def load_recipe(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EvitError(f"recipe {path} does not exist: see the recipes/ folder")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EvitError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvitError(f"recipe {path} must be a mapping of option names to values")
    return data


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """DDP when started by torchrun (WORLD_SIZE > 1), a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_sum(values: list[float], d: Dist, device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- device and learning rate


def _resolve_device(name: str | None, d: Dist) -> torch.device:
    dev = resolve_device(name)
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    return dev


def resolve_lr(cfg: TrainConfig, global_batch: int) -> tuple[float, float, str | None]:
    """Peak and final learning rate, and a note when ``min_lr`` had to be clamped to the peak."""
    if cfg.lr is not None:
        base = cfg.lr
    elif cfg.lr_per_512 is not None:
        base = cfg.lr_per_512 * global_batch / 512
    else:
        base = DEFAULT_LR
    if base <= 0:
        raise EvitError(f"the learning rate must be above 0, got {base:g}: give --lr")
    if cfg.min_lr > base:
        return base, base, f"--min-lr {cfg.min_lr:g} is above the peak learning rate {base:g}: clamped to the peak"
    return base, cfg.min_lr, None


# --------------------------------------------------------------------------- the model, its head and its teacher


@dataclass
class Setup:
    model: nn.Module  # the EViT student
    adapter: object
    data: object  # data.ImageData
    head: str  # "keep", "new", or "none" (a headless model with labels: they only score kNN top-1)
    label_map: list[int] | None  # data set class -> model class, when the head is kept
    teacher: object  # distill.Teacher or None
    loss: str  # what the loss is, in words
    previous: dict | None  # the model's own training record, when it was fine-tuned before
    oracle: object = None  # oracle.Oracle while training with --oracle
    oracle_source: str | None = None

    @property
    def trains_on_labels(self) -> bool:
        """Whether the labels enter the loss (not for a model that stays headless)."""
        from .distill import labels_in_loss

        return labels_in_loss(self.data.labelled, self.head)


def prepare(cfg: TrainConfig, device: torch.device) -> Setup:
    """Model, data, head and teacher. The dense model before conversion is taken here, once:
    it is the teacher unless ``--teacher`` names another."""
    from ..io.data import load_image_data
    from ..io.loading import load_model
    from ..model.classes import choose_head
    from .distill import build_teacher

    size = {} if cfg.num_classes is None else {"num_classes": cfg.num_classes}
    model = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, **size)
    adapter = adapters.get_adapter(model)
    if cfg.img_size is not None:
        if cfg.img_size < 1:
            raise EvitError(f"--img-size must be positive, got {cfg.img_size}")
        adapter.set_img_size(model, validate.image_size("--img-size", model, cfg.img_size))
    data = load_image_data(
        cfg.dataset, train_split=cfg.train_split, val_split=cfg.val_split, val_fraction=cfg.val_fraction,
        image_column=cfg.image_column, label_column=cfg.label_column, streaming=cfg.streaming, seed=cfg.seed,
    )
    dense = dense_copy(model)  # the dense model before conversion (and before a new head)
    head, mapping = choose_head(cfg.head, data.class_names, model)
    if head == "new":
        adapter.reset_head(model, data.num_classes, data.class_names)
    elif mapping == list(range(adapter.num_classes(model))):
        if not adapter.class_names(model):
            adapter.set_class_names(model, data.class_names)
        mapping = None
    teacher, loss = build_teacher(cfg.distill, cfg.teacher, dense, head, adapter.num_classes(model),
                                  data.class_names, data.labelled, cfg.distill_loss,
                                  cfg.distill_tau, cfg.distill_features, cfg.distill_layers)
    if teacher is not None:
        t_adapter = adapters.get_adapter(teacher.model)
        if t_adapter.img_size(teacher.model) != adapter.img_size(model):
            t_adapter.set_img_size(teacher.model, adapter.img_size(model))
        teacher.model.to(device)
    previous = model_state(model).training
    convert_keeping(model, cfg.keep_rate, cfg.layers, cfg.fuse)
    model.to(device)
    setup = Setup(model, adapter, data, head, mapping, teacher, loss, previous)
    if cfg.oracle:
        setup.oracle, setup.oracle_source = _oracle(setup, dense, device)
    return setup


def _oracle(s: Setup, dense: nn.Module, device: torch.device):
    """The oracle that chooses the student's tokens: the teacher when there is one (one forward
    serves both), else the dense model before conversion."""
    from ..model.oracle import Oracle

    if s.teacher is not None:
        return Oracle(s.model, s.teacher.model), s.teacher.source
    o_adapter = adapters.get_adapter(dense)
    if o_adapter.img_size(dense) != s.adapter.img_size(s.model):
        o_adapter.set_img_size(dense, s.adapter.img_size(s.model))
    return Oracle(s.model, dense.to(device)), "the dense model before conversion"


def _teacher_outputs(teacher, oracle, oracle_out, images):
    """The teacher's output for this batch; when the teacher is the oracle, from the forward it already ran."""
    if teacher is None:
        return None
    if oracle is not None and oracle.teacher is teacher.model:
        return teacher.from_output(oracle_out)
    return teacher.outputs(images)


def head_note(s: Setup) -> str:
    n = s.adapter.num_classes(s.model)
    if s.head == "new":
        return f"new: {n} classes from the data set"
    if s.head == "none":
        return ("none: the model is headless, its embedding is distilled; the labels score kNN top-1 in validation "
                "(--head new trains a classifier on them)")
    if not s.data.labelled:
        return f"kept: the model's {n} classes (the data set has no labels)"
    how = "mapped onto them" if s.label_map is not None else "the same"
    return f"kept: the model's {n} classes (the data set's {s.data.num_classes} classes {how})"


# --------------------------------------------------------------------------- the run


def run_folders(cfg: TrainConfig) -> tuple[Path, Path]:
    """The output folder (the exported model) and the training folder (checkpoint, progress)."""
    if not cfg.output:
        raise EvitError("no output folder: give -o/--output")
    out = Path(cfg.output)
    train_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.parent / f"{out.name}.train"
    if cfg.resume and not (train_dir / ckpt.CHECKPOINT).is_file() and (out / ckpt.CHECKPOINT).is_file():
        train_dir = out  # a run started by an earlier version kept its checkpoint inside
    return out, train_dir


def _start_folders(cfg: TrainConfig, out: Path, train_dir: Path, d) -> bool:
    """Check the output and training folders; returns whether the run resumes."""
    resuming = cfg.resume and (train_dir / ckpt.CHECKPOINT).is_file()
    if cfg.resume and not resuming:
        raise EvitError(f"nothing to resume: {train_dir / ckpt.CHECKPOINT} does not exist; drop --resume to start")
    if resuming:
        return True
    busy = [p for p in (out, train_dir) if p.exists() and any(p.iterdir())]
    if busy and not cfg.overwrite:
        raise EvitError(f"{busy[0]} already exists: choose another -o, pass --resume to continue it, or --overwrite")
    return False


def _create_folders(cfg: TrainConfig, out: Path, train_dir: Path) -> None:
    """A new run: clear what --overwrite replaces, then the output folder with the run's settings."""
    for p in (out, train_dir):
        if p.exists() and any(p.iterdir()):
            shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, asdict(cfg))


def _check(cfg: TrainConfig) -> None:
    if cfg.accum_steps < 1 or cfg.batch_size < 1 or (cfg.epochs is not None and cfg.epochs <= 0):
        raise EvitError("--batch-size and --accum-steps must be at least 1 and --epochs above 0")
    if not 0 <= cfg.distill_alpha <= 1:
        raise EvitError(f"--distill-alpha must be between 0 and 1, got {cfg.distill_alpha}")


def _datasets(cfg: TrainConfig, s: Setup, d, bad_images=None):
    """Transformed train/val data sets and samplers (a seeded augmentation per image)."""
    from ..io.data import ResumableSampler, transforms, with_transform

    data_config = s.adapter.data_config(s.model)
    train_tf = transforms(data_config, train=True, randaugment=cfg.randaugment, color_jitter=cfg.color_jitter)
    cols = (s.data.image_column, s.data.label_column)
    train_ds = with_transform(s.data.train, *cols, train_tf, seed=cfg.seed + 1000003 * d.rank, label_map=s.label_map,
                              bad=bad_images)
    val_ds = with_transform(s.data.val, *cols, transforms(data_config, train=False), label_map=s.label_map,
                            bad=bad_images)
    if not cfg.streaming:
        return (train_ds, val_ds,
                ResumableSampler(len(train_ds), seed=cfg.seed, shuffle=True, rank=d.rank, world=d.world),
                ResumableSampler(len(val_ds), seed=0, shuffle=False, rank=d.rank, world=d.world))
    from datasets.distributed import split_dataset_by_node

    if not cfg.steps_per_epoch:
        raise EvitError("--streaming needs --steps-per-epoch: a stream has no length")
    train_ds = split_dataset_by_node(train_ds.shuffle(seed=cfg.seed, buffer_size=1000), rank=d.rank, world_size=d.world)
    return train_ds, split_dataset_by_node(val_ds, rank=d.rank, world_size=d.world), None, None


def _labels(split, column: str):
    """The label column of a map-style split, as a NumPy array (no image is read)."""
    return np.asarray(split.select_columns([column]).with_format("numpy")[column])


def check_data(s: Setup) -> None:
    """What a run needs of its data, checked before anything is written: a validation split with
    images, and, when the labels can be read ahead (not streaming), labels that are classes of the
    data set and, for a new head, at least two of them."""
    data = s.data
    if hasattr(data.val, "__len__") and len(data.val) == 0:
        raise EvitError(f"the validation split ({data.val_source}) has no images: give --val-split, or a larger "
                        f"--val-fraction")
    if not s.trains_on_labels or not hasattr(data.train, "select_columns") or not hasattr(data.train, "__len__"):
        return
    n = data.num_classes
    for name, split, unlabelled in (("training", data.train, ()), ("validation", data.val, (-1,))):
        values = np.unique(_labels(split, data.label_column))
        bad = [int(v) for v in values if not 0 <= v < n and v not in unlabelled]
        if bad:
            raise EvitError(f"the {name} split has labels {bad[:5]} outside the data set's {n} classes (0 to {n - 1}): "
                            "correct the label column, or name another with --label-column")
        if name == "training" and s.head == "new" and len(values) < 2:
            raise EvitError(f"the training split has a single class ({data.class_names[int(values[0])]!r}): a new head "
                            "needs images of 2 classes or more; add the others, or drop the labels (a flat folder of "
                            "images) to distil the model's own head")


def _optimizer(model: nn.Module, cfg: TrainConfig, lr: float):
    decay, no_decay = [], []
    skip = ("cls_token", "pos_embed", "dist_token", "reg_token", "position_embeddings", "distillation_token")
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(skip) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


# --------------------------------------------------------------------------- resuming

RESUME_MAY_CHANGE = frozenset({"output", "workers", "device", "save_every", "checkpoint_dir", "resume", "overwrite",
                               "bench", "bench_batch", "extra"})
PATH_SETTINGS = ("model", "dataset", "checkpoint", "teacher")


def _last_part(value):
    """A path's last part (a hub name's own name); anything else as it is."""
    return (Path(value.rstrip("/\\")).name or value) if isinstance(value, str) else value


def _shown(value) -> str:
    return "(not given)" if value is None else str(value)


def changed_setting(started: dict, now: dict) -> str | None:
    """The first setting that ``now`` changes from the run ``started`` with, in words; None when
    none does. Paths are compared by their last part: a data set may be reached from elsewhere."""
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in started:
            continue
        old = started[key]
        if key in PATH_SETTINGS:
            old, value = _last_part(old), _last_part(value)
        if old != value:
            flag = "MODEL" if key == "model" else "--" + key.replace("_", "-")
            return f"{flag} {_shown(started[key])}, these settings give {_shown(now[key])}"
    return None


def _started_settings(out: Path) -> dict:
    path = out / CONFIG_FILE
    if not out.is_dir():
        raise EvitError(f"the run's output folder {out} is missing (its logs and settings): {ckpt.START_AGAIN}")
    if not path.is_file():
        raise EvitError(f"{path} is missing, so the run's settings are unknown: put it back, or {ckpt.START_AGAIN}")
    try:
        started = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        started = None
    if not isinstance(started, dict):
        raise EvitError(f"{path} is not the run's settings (a JSON mapping): put it back, or {ckpt.START_AGAIN}")
    return started


def read_resume(cfg: TrainConfig, out: Path, train_dir: Path) -> dict:
    """The checkpoint to resume from, once it and the run folder it belongs to are known good:
    readable, started with these settings, and logs that hold every step and epoch it holds
    (they are written before it, so a kill cannot lose them)."""
    state = ckpt.read(train_dir / ckpt.CHECKPOINT)
    changed = changed_setting(_started_settings(out), json.loads(json.dumps(asdict(cfg), default=str)))
    if changed:
        raise EvitError(f"{out} was started with {changed}: resume with the same settings, or {ckpt.START_AGAIN}")
    pos = ckpt.Position.of(state)
    for name, done, key, want in ((STEP_LOG, pos.step, "step", pos.step),
                                  (METRICS_LOG, pos.epoch + 1, "epoch", pos.epoch)):
        rows = ckpt.log_rows(out / name, done, key) or []
        if len(rows) < want:
            raise EvitError(f"{out / name} holds {len(rows)} of the {want} {key}s the checkpoint holds: the run folder "
                            f"is incomplete; {ckpt.START_AGAIN}")
    return state


def _load_weights(run: Run, state: dict) -> None:
    path = run.train_dir / ckpt.CHECKPOINT
    if state["total_steps"] != run.sched.total_steps:
        raise EvitError(f"{run.out} was started with {state['total_steps']} steps, these settings give "
                        f"{run.sched.total_steps}: resume with the same settings")
    try:
        run.s.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Error(s) in loading")]
        raise EvitError(f"the checkpoint {path} does not fit this model ({(why or [type(e).__name__])[0][:200]}): "
                        f"resume with the model it was made from, or {ckpt.START_AGAIN}") from None


def _restore(run: Run, state: dict) -> None:
    """Continue from ``state``: weights, optimizer, scaler, step and RNG; the logs and
    progress.json cut back to what it holds, no more."""
    _load_weights(run, state)
    run.start = ckpt.Position.of(state)
    run.step = run.start.step
    ckpt.set_rng_state(state["rng"][min(run.d.rank, len(state["rng"]) - 1)])
    if run.d.main:
        ckpt.truncate_log(run.out / STEP_LOG, run.start.step, "step")
        ckpt.truncate_log(run.out / METRICS_LOG, run.start.epoch + 1, "epoch")
        ckpt.write_progress(run.train_dir, state)


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """A fine-tune under way: what it trains, where it writes, and how far it is."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    s: Setup
    out: Path
    train_dir: Path
    sched: Schedule
    loaders: tuple  # train and val data sets, their samplers (None when streaming)
    optimizer: object
    scaler: object
    notes: list[str]
    bad_images: object = None  # a data.BadImages that skips and counts undecodable images, or None
    net: nn.Module | None = None  # the model, or its DDP wrapper
    start: ckpt.Position = field(default_factory=ckpt.Position)
    step: int = 0
    history: list[dict] = field(default_factory=list)


def _schedule(cfg: TrainConfig, s: Setup, sampler, d: Dist) -> tuple[Schedule, str | None]:
    per_epoch = steps_per_epoch(sampler.per_rank if sampler else None, batch_size=cfg.batch_size,
                                accum_steps=cfg.accum_steps, given=cfg.steps_per_epoch, world=d.world)
    base_lr, min_lr, lr_note = resolve_lr(cfg, cfg.batch_size * cfg.accum_steps * d.world)
    sched = Schedule.plan(recovery_epochs(cfg, s), cfg.warmup_epochs, per_epoch, base_lr=base_lr, min_lr=min_lr,
                          keep_targets=tuple(get_config(s.model).keep_rates), shrink_start=cfg.shrink_start,
                          shrink_epochs=cfg.shrink_epochs)
    return sched, lr_note


def recovery_epochs(cfg: TrainConfig, s: Setup) -> float:
    """``--epochs``, or by default 2, and 4 for a model that outputs an embedding (no classification
    head): on the held-out real photos 4 epochs raised an embedding model's fidelity on classes the
    folder did not show (benchmarks/embed_real.py) and lowered a classifier's top-1 there
    (benchmarks/recovery_variants.py); the README has both."""
    if cfg.epochs is not None:
        return cfg.epochs
    return 4.0 if s.adapter.num_classes(s.model) == 0 else 2.0


def mixed(cfg: TrainConfig, s: Setup, images: torch.Tensor, target: torch.Tensor):
    """The batch mixed as --mixup/--cutmix say (the same images for the student and the teacher),
    and, with labels, its soft targets; unchanged when both are off."""
    from ..io.data import mix_batch, mixed_target

    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return images, target
    images, lam, perm = mix_batch(images, cfg.mixup, cfg.cutmix)
    if s.trains_on_labels:
        target = mixed_target(target, s.adapter.num_classes(s.model), lam, perm, cfg.smoothing)
    return images, target


def _start(cfg: TrainConfig, d: Dist, device: torch.device, bad_images=None) -> Run:
    """Check and build everything, resuming when asked; the first file is written only when all of
    it is known good (user mistakes in the model, data, head, teacher or checkpoint stop before)."""
    _check(cfg)
    out, train_dir = run_folders(cfg)
    state = read_resume(cfg, out, train_dir) if _start_folders(cfg, out, train_dir, d) else None
    ckpt.seed_all(cfg.seed + d.rank)
    s = prepare(cfg, device)
    check_data(s)
    loaders = _datasets(cfg, s, d, bad_images)
    sched, lr_note = _schedule(cfg, s, loaders[2], d)
    if state is None and d.main:
        _create_folders(cfg, out, train_dir)
    optimizer = _optimizer(s.model, cfg, sched.base_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"
                                  and amp_dtype(device) == torch.float16)
    notes = [lr_note] if lr_note else []
    run = Run(cfg, d, device, s, out, train_dir, sched, loaders, optimizer, scaler, notes, bad_images)
    if state is not None:
        _restore(run, state)
    if d.world > 1:
        dist.barrier()
    run.net = s.model
    if d.world > 1:
        run.net = nn.parallel.DistributedDataParallel(s.model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    return run


def finetune(cfg: TrainConfig, console=None, bad_images=None) -> dict:
    """Run the fine-tune described by ``cfg``; returns the final metrics. ``bad_images``: a
    :class:`evit_cli.io.data.BadImages` that skips and counts undecodable images (default: stop at one)."""
    d = init_distributed(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _start(cfg, d, _resolve_device(cfg.device, d), bad_images)
    show = console is not None and d.main
    progress = _progress(show, console)
    with progress:
        for epoch in range(run.start.epoch, run.sched.num_epochs):
            _train_epoch(run, epoch, progress)
            _end_epoch(run, epoch, console if show else None)
    final = _finish(run, console)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def _epoch_loader(run: Run, epoch: int, first: int):
    """The training batches of ``epoch``, from its step ``first`` on."""
    from ..io.data import make_loader

    cfg, (train_ds, _, sampler, _) = run.cfg, run.loaders
    train_ds.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch, first * cfg.batch_size * cfg.accum_steps)
    loader = make_loader(train_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=sampler,
                         drop_last=True, seed=cfg.seed + epoch)
    if sampler is None and first:  # a stream cannot seek: read past the batches already done
        loader = itertools.islice(loader, first * cfg.accum_steps, None)
    return loader


@dataclass
class _Tally:
    """The micro-batches of the optimizer step under way, and the epoch's pace."""

    in_epoch: int
    micro: int = 0
    seen: int = 0
    loss: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


def _train_epoch(run: Run, epoch: int, progress) -> None:
    first = run.start.first_step(epoch)
    steps = run.sched.steps_in_epoch(epoch)
    task = progress.add_task(f"epoch {epoch + 1}/{run.sched.num_epochs}", total=steps, completed=first, unit="steps")
    run.net.train()
    tally = _Tally(first)
    for images, target in _epoch_loader(run, epoch, first):
        if tally.in_epoch >= steps:
            break
        rates, lr = run.sched.at(run.step)
        if _forward_backward(run, images, target, rates, lr, tally):
            _optimizer_step(run, tally)
            _log_step(run, epoch, rates, lr, tally, progress, task)
            if ckpt.save_due(run.step, tally.in_epoch, steps, run.cfg.save_every):
                _save(run, epoch, tally.in_epoch)
    progress.remove_task(task)
    if tally.in_epoch == first < steps:
        _no_batch(epoch, run.bad_images)


def _no_batch(epoch: int, bad_images=None):
    if bad_images is not None and bad_images.count:
        raise EvitError(f"epoch {epoch + 1} took no step: all {bad_images.count} images it read could not be decoded "
                        "and were skipped; check the data set")
    raise EvitError(f"epoch {epoch + 1} took no step: the training split gave no batch; check the data set")


def _forward_backward(run: Run, images, target, rates: list[float], lr: float, tally: _Tally) -> bool:
    """One micro-batch, its gradients added; returns whether it completes an optimizer step."""
    from .distill import inner_outputs, inner_term, training_loss

    s, cfg = run.s, run.cfg
    adapters.set_keep_rates(s.model, rates)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    images, target = images.to(run.device, non_blocking=True), target.to(run.device, non_blocking=True)
    images, target = mixed(cfg, s, images, target)
    sync = (tally.micro + 1) % cfg.accum_steps == 0
    ctx = run.net.no_sync() if (run.d.world > 1 and not sync) else contextlib.nullcontext()
    guide = s.oracle.guiding(images) if s.oracle is not None else contextlib.nullcontext()
    with inner_outputs(s.model, s.teacher) as inner, ctx, autocast(run.device, cfg.amp), guide as oracle_out:
        out = s.adapter.output(s.model, run.net(images)).float()
        t_out = _teacher_outputs(s.teacher, s.oracle, oracle_out, images)
        kind = s.teacher.kind if s.teacher is not None else None
        loss = training_loss(out, target, t_out, labelled=s.trains_on_labels, alpha=cfg.distill_alpha, kind=kind,
                             tau=cfg.distill_tau, smoothing=cfg.smoothing,
                             inner=inner_term(inner, s.teacher)) / cfg.accum_steps
    run.scaler.scale(loss).backward()
    tally.loss += loss.item()
    tally.seen += images.shape[0]
    tally.micro += 1
    return sync


def _optimizer_step(run: Run, tally: _Tally) -> None:
    if not math.isfinite(tally.loss):
        raise EvitError(f"the loss became {tally.loss} at step {run.step}: lower --lr or turn off --amp")
    if run.cfg.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.s.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _log_step(run: Run, epoch: int, rates: list[float], lr: float, tally: _Tally, progress, task) -> None:
    """The step's row in the log and the progress line; then the step is done."""
    ips = tally.seen * run.d.world / (time.perf_counter() - tally.t0)
    if run.d.main:
        ckpt.append(run.out / STEP_LOG,
                    {"step": run.step, "epoch": epoch, "lr": lr, "keep_rate": rates, "loss": tally.loss})
    progress.update(task, advance=1, loss=tally.loss, lr=lr, keep=",".join(f"{r:.3f}" for r in rates), ips=ips)
    run.step += 1
    tally.in_epoch += 1
    tally.loss = 0.0


def _checkpoint_state(run: Run, epoch: int, in_epoch: int) -> dict:
    rngs = [ckpt.rng_state()]
    if run.d.world > 1:
        gathered = [None] * run.d.world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    sched = run.sched
    return {
        "model": run.s.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "scheduler": {"step": run.step, "total_steps": sched.total_steps, "warmup_steps": sched.warmup_steps,
                      "base_lr": sched.base_lr},
        "epoch": epoch, "step": run.step, "step_in_epoch": in_epoch, "total_steps": sched.total_steps, "rng": rngs,
    }


def _save(run: Run, epoch: int, in_epoch: int) -> None:
    state = _checkpoint_state(run, epoch, in_epoch)  # every rank: the RNG states are gathered
    if run.d.main:
        ckpt.save(run.train_dir, state)


def _end_epoch(run: Run, epoch: int, console) -> None:
    """Validation, the epoch's metrics row, and the end-of-epoch checkpoint."""
    s = run.s
    _, val_ds, _, val_sampler = run.loaders
    metrics = evaluate(run.net, s.model, s.adapter, val_ds, val_sampler, run.cfg, run.device, run.d, s.teacher,
                       run.bad_images)
    rates, lr = run.sched.after(run.step)
    metrics.update(epoch=epoch + 1, step=run.step, keep_rate=rates, lr=lr, split=s.data.val_source)
    run.history.append(metrics)
    state = _checkpoint_state(run, epoch + 1, 0)
    if run.d.main:
        ckpt.append(run.out / METRICS_LOG, metrics)
        ckpt.save(run.train_dir, state)
        if console is not None:
            console.print(f"epoch {epoch + 1}/{run.sched.num_epochs}: {describe_metrics(metrics)}", highlight=False)


def _finish(run: Run, console) -> dict:
    """The final metrics; on the main process, the output folder becomes the exported model."""
    s, cfg = run.s, run.cfg
    adapters.set_keep_rates(s.model, list(run.sched.keep_targets))
    final = run.history[-1] if run.history else json.loads((run.out / METRICS_LOG).read_text().splitlines()[-1])
    if s.oracle is not None:
        s.oracle.detach()  # the exported model chooses by its own attention, as always
    final = {**final, "head": head_note(s), "loss": s.loss, "notes": run.notes, "checkpoint_dir": str(run.train_dir)}
    if run.d.main:
        sampler = run.loaders[2]
        record = training_record(cfg, s, final, total_steps=run.sched.total_steps,
                                 global_batch=cfg.batch_size * cfg.accum_steps * run.d.world, lr=run.sched.base_lr,
                                 train_images=len(s.data.train) if sampler else None)
        _export(s.model, run.out, final, record, cfg, run.device, console)
    return final


def describe_metrics(m: dict) -> str:
    parts = []
    if "agreement" in m:
        parts.append(f"agreement with the teacher {m['agreement']:.2f}%, KL {m['kl']:.4f}")
    if "cosine" in m:
        parts.append(f"cosine to the teacher's embedding {m['cosine']:.4f}")
    if "neighbour_overlap" in m:
        parts.append(f"{NEIGHBOURS}-NN overlap {m['neighbour_overlap']:.2f}%")
    if "knn_top1" in m:
        parts.append(f"kNN top-1 {m['knn_top1']:.2f}%")
    if "top1" in m:
        parts.append(f"val loss {m['val_loss']:.4f}, top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%")
    parts.append(f"keep {','.join(f'{r:.3f}' for r in m['keep_rate'])} ({m['images']} images: {m['split']})")
    return "; ".join(parts)


@torch.no_grad()
def evaluate(net, model, adapter, val_ds, val_sampler, cfg: TrainConfig, device, d: Dist, teacher=None,
             bad_images=None) -> dict:
    """On the validation split, summed over ranks: agreement and KL with the teacher when there is
    one, val loss, top-1 and top-5 (%) when there are labels; for an embedding model, cosine and
    neighbour overlap with the teacher's embedding and kNN top-1 (see :mod:`.fidelity`)."""
    from ..io.data import make_loader
    from ..measure.fidelity import Tally

    net.eval()
    loader = make_loader(val_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=val_sampler)
    tally = Tally(embedding=adapter.num_classes(model) == 0)
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        with autocast(device, cfg.amp):
            logits = adapter.output(model, net(images)).float()
            ref = teacher.outputs(images) if teacher is not None else None
        tally.add(logits, ref, target)
    keys = list(tally.sums)
    tally.sums = dict(zip(keys, _all_sum([tally.sums[k] for k in keys], d, device)))
    if tally.embedding and d.world > 1:  # the set-level measures need every rank's embeddings
        parts = [None] * d.world
        dist.all_gather_object(parts, tally.kept)
        tally.merge_kept(parts)
    if tally.sums["images"] == 0:
        _no_validation_image(bad_images)
    return tally.result()


def _no_validation_image(bad_images=None):
    if bad_images is not None and bad_images.count:
        raise EvitError("no image of the validation split could be decoded (all were skipped): check the data set, "
                        "or give another with --val-split")
    raise EvitError("the validation split is empty: give --val-split or a larger --val-fraction")


def training_record(cfg: TrainConfig, s: Setup, final: dict, *, total_steps: int, global_batch: int, lr: float,
                    train_images: int | None) -> dict:
    """What the fine-tuned folder says about how it was made (evit.json, model card, info, eval)."""
    t = s.teacher
    return {
        # the dense model it started from (evaluate.origin_of), a folder by its absolute path;
        # pretrained None: a folder's own weights
        "from": {"model": str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
                 "checkpoint": cfg.checkpoint,
                 "pretrained": None if Path(cfg.model).is_dir() and not cfg.checkpoint else cfg.pretrained},
        "dataset": cfg.dataset, "train_split": cfg.train_split, "train_images": train_images,
        "labels": s.data.labelled, "loss": s.loss, "head": head_note(s),
        "token_selection": f"oracle: {s.oracle_source}" if s.oracle_source else "own class attention",
        "distillation": None if t is None else {
            "teacher": t.source, "loss": t.kind, "alpha": cfg.distill_alpha if s.trains_on_labels else 1.0,
            "tau": cfg.distill_tau, "features": t.features, "layers": t.layers, "mixup": cfg.mixup,
            "cutmix": cfg.cutmix},
        "steps": total_steps, "epochs": recovery_epochs(cfg, s), "global_batch": global_batch, "lr": lr,
        "weight_decay": cfg.weight_decay, "img_size": s.adapter.img_size(s.model),
        "metrics_split": f"{final['split']}, {final['images']} images", "previous": s.previous,
    }


def _export(model, out: Path, final: dict, record: dict, cfg: TrainConfig, device, console) -> None:
    """The output folder becomes an exported model, with metrics.json and the bench report."""
    import tempfile

    from ..io import folder as artifact
    from ..measure.report import write_bench

    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    try:
        artifact.save(model, tmp / "m", extra={"metrics": final, "training": record})
        for f in (tmp / "m").iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / "metrics.json", final)
    if cfg.bench:
        from ..measure.bench import bench

        report = bench(model, batch=cfg.bench_batch, device=device.type, reps=5, warmup=1, progress=console is not None)
        write_bench(report, out)


def _progress(enabled: bool, console):
    """Steps of each epoch with loss, lr, keep rate and images/s: a bar on a terminal, timestamped lines otherwise."""
    from ..utils.progress import Progress

    return Progress(enabled=enabled, stream=getattr(console, "file", None))
