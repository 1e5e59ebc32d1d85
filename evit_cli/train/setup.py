"""What a run is set up with: the processes (one, or data-parallel under ``torchrun``), the device,
the model, its head and its teacher, the data (checked before anything is written), the
optimizer and the schedule of keep rates and learning rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import adapters
from ..algorithm.schedule import Schedule, steps_per_epoch
from ..algorithm.state import model_state
from ..errors import EvitError
from ..model import validate
from ..model.convert import convert_keeping, dense_copy, get_config
from ..utils.device import resolve_device
from .config import DEFAULT_LR, TrainConfig

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


def all_sum(values: list[float], d: Dist, device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def run_device(name: str | None, d: Dist) -> torch.device:
    """The device of this process: ``name`` (default cuda when available), its local GPU under DDP."""
    dev = resolve_device(name)
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    return dev


# --------------------------------------------------------------------------- the model, its head and its teacher


@dataclass
class Setup:
    model: nn.Module  # the EViT student
    adapter: object
    data: object  # io.datasets.ImageData
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
    from ..io.datasets import load_image_data
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
    convert_keeping(model, cfg.keep_rate, cfg.layers, cfg.fuse, cfg.method)
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


# --------------------------------------------------------------------------- the data


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


# --------------------------------------------------------------------------- optimizer and schedule


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


def recovery_epochs(cfg: TrainConfig, s: Setup) -> float:
    """``--epochs``, or by default 2, and 4 for a model that outputs an embedding (no classification
    head): on the held-out real photos 4 epochs raised an embedding model's fidelity on classes the
    folder did not show (benchmarks/embed_real.py) and lowered a classifier's top-1 there
    (benchmarks/research/recovery_variants.py); docs/finetuning.md has both."""
    if cfg.epochs is not None:
        return cfg.epochs
    return 4.0 if s.adapter.num_classes(s.model) == 0 else 2.0


def plan_schedule(cfg: TrainConfig, s: Setup, sampler, d: Dist) -> tuple[Schedule, str | None]:
    """The keep rates and learning rate of every step, and a note when the lr was clamped."""
    per_epoch = steps_per_epoch(sampler.per_rank if sampler else None, batch_size=cfg.batch_size,
                                accum_steps=cfg.accum_steps, given=cfg.steps_per_epoch, world=d.world)
    base_lr, min_lr, lr_note = resolve_lr(cfg, cfg.batch_size * cfg.accum_steps * d.world)
    sched = Schedule.plan(recovery_epochs(cfg, s), cfg.warmup_epochs, per_epoch, base_lr=base_lr, min_lr=min_lr,
                          keep_targets=tuple(get_config(s.model).keep_rates), shrink_start=cfg.shrink_start,
                          shrink_epochs=cfg.shrink_epochs)
    return sched, lr_note


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float):
    """AdamW; no weight decay on biases, norms, and the class, distillation, register and position tokens."""
    decay, no_decay = [], []
    skip = ("cls_token", "pos_embed", "dist_token", "reg_token", "position_embeddings", "distillation_token")
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(skip) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)
