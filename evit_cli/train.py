"""Fine-tune an EViT model with the keep-rate schedule of EVIT.md.

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

import torch
import torch.distributed as dist
from torch import nn

from . import adapters, checkpoint as ckpt
from .core import convert_keeping, dense_copy, get_config
from .device import autocast, resolve_device
from .errors import EvitError
from .fsutil import write_json
from .schedule import keep_rate_at

METRICS_LOG = "metrics.jsonl"
STEP_LOG = "train_log.jsonl"
DEFAULT_LR = 5e-5  # recipes/recover.yaml: AdamW at batch 32 on a pretrained model


@dataclass
class TrainConfig:
    """Everything a run needs; recipes (YAML) and flags fill it. Epoch counts may be fractional.

    The defaults are the recovery recipe (recipes/recover.yaml): distil from the dense model,
    AdamW lr 5e-5, weight decay 0.05, batch 32, random-resized crop and flip, cosine, 2 epochs.
    """

    model: str = ""
    dataset: str = ""
    output: str = ""
    keep_rate: object = None  # one rate or one per layer; None: the model's own, else 0.7
    layers: object = None  # 1-based; None: the model's own, else 4,7,10
    fuse: bool | None = None
    pretrained: bool = True
    checkpoint: str | None = None
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
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1  # label smoothing of the label term (there is none without labels)
    # optimisation
    epochs: float = 2
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
    distill_alpha: float = 0.5  # weight of the KL term when there are labels
    distill_tau: float = 1.0
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
    def merged(cls, recipe: dict | None, flags: dict) -> "TrainConfig":
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


# --------------------------------------------------------------------------- schedules


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up to ``base``, then cosine down to ``minimum`` at ``total`` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def keep_rates_at(step: int, targets, steps_per_epoch: int, cfg: TrainConfig) -> list[float]:
    return [keep_rate_at(step, t, steps_per_epoch, cfg.shrink_start, cfg.shrink_epochs) for t in targets]


# --------------------------------------------------------------------------- the run


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
    head: str  # "keep" or "new"
    label_map: list[int] | None  # data set class -> model class, when the head is kept
    teacher: object  # distill.Teacher or None
    loss: str  # what the loss is, in words
    previous: dict | None  # the model's own training record, when it was fine-tuned before
    oracle: object = None  # oracle.Oracle while training with --oracle
    oracle_source: str | None = None


def prepare(cfg: TrainConfig, device: torch.device) -> Setup:
    """Model, data, head and teacher. The dense model before conversion is taken here, once:
    it is the teacher unless ``--teacher`` names another."""
    from .classes import choose_head
    from .data import load_image_data
    from .distill import build_teacher
    from .loading import load_model

    model = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    adapter = adapters.get_adapter(model)
    if cfg.img_size is not None:
        if cfg.img_size < 1:
            raise EvitError(f"--img-size must be positive, got {cfg.img_size}")
        adapter.set_img_size(model, cfg.img_size)
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
                                  data.class_names, data.labelled)
    if teacher is not None:
        t_adapter = adapters.get_adapter(teacher.model)
        if t_adapter.img_size(teacher.model) != adapter.img_size(model):
            t_adapter.set_img_size(teacher.model, adapter.img_size(model))
        teacher.model.to(device)
    previous = getattr(model, "evit_training", None)
    convert_keeping(model, cfg.keep_rate, cfg.layers, cfg.fuse)
    model.to(device)
    setup = Setup(model, adapter, data, head, mapping, teacher, loss, previous)
    if cfg.oracle:
        setup.oracle, setup.oracle_source = _oracle(setup, dense, device)
    return setup


def _oracle(s: Setup, dense: nn.Module, device: torch.device):
    """The oracle that chooses the student's tokens: the teacher when there is one (one forward
    serves both), else the dense model before conversion."""
    from .oracle import Oracle

    if s.teacher is not None:
        return Oracle(s.model, s.teacher.model), s.teacher.source
    o_adapter = adapters.get_adapter(dense)
    if o_adapter.img_size(dense) != s.adapter.img_size(s.model):
        o_adapter.set_img_size(dense, s.adapter.img_size(s.model))
    return Oracle(s.model, dense.to(device)), "the dense model before conversion"


def _teacher_logits(teacher, oracle, oracle_out, images):
    """The teacher's logits for this batch; when the teacher is the oracle, from the forward it already ran."""
    if teacher is None:
        return None
    if oracle is not None and oracle.teacher is teacher.model:
        return teacher.from_output(oracle_out)
    return teacher.logits(images)


def head_note(s: Setup) -> str:
    n = s.adapter.num_classes(s.model)
    if s.head == "new":
        return f"new: {n} classes from the data set"
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
    write_json(out / "train_config.json", asdict(cfg))


def _check(cfg: TrainConfig) -> None:
    if cfg.accum_steps < 1 or cfg.batch_size < 1 or cfg.epochs <= 0:
        raise EvitError("--batch-size and --accum-steps must be at least 1 and --epochs above 0")
    if not 0 <= cfg.distill_alpha <= 1:
        raise EvitError(f"--distill-alpha must be between 0 and 1, got {cfg.distill_alpha}")


def _datasets(cfg: TrainConfig, s: Setup, d, bad_images=None):
    """Transformed train/val data sets and samplers (a seeded augmentation per image)."""
    from .data import ResumableSampler, transforms, with_transform

    data_config = s.adapter.data_config(s.model)
    train_tf = transforms(data_config, train=True, randaugment=cfg.randaugment, color_jitter=cfg.color_jitter)
    cols = (s.data.image_column, s.data.label_column)
    train_ds = with_transform(s.data.train, *cols, train_tf, seed=cfg.seed + 1000003 * d.rank, label_map=s.label_map,
                              bad=bad_images)
    val_ds = with_transform(s.data.val, *cols, transforms(data_config, train=False), label_map=s.label_map,
                            bad=bad_images)
    if not cfg.streaming:
        return (train_ds, val_ds, ResumableSampler(len(train_ds), seed=cfg.seed, shuffle=True, rank=d.rank, world=d.world),
                ResumableSampler(len(val_ds), seed=0, shuffle=False, rank=d.rank, world=d.world))
    from datasets.distributed import split_dataset_by_node

    if not cfg.steps_per_epoch:
        raise EvitError("--streaming needs --steps-per-epoch: a stream has no length")
    train_ds = split_dataset_by_node(train_ds.shuffle(seed=cfg.seed, buffer_size=1000), rank=d.rank, world_size=d.world)
    return train_ds, split_dataset_by_node(val_ds, rank=d.rank, world_size=d.world), None, None


def _optimizer(model: nn.Module, cfg: TrainConfig, lr: float):
    decay, no_decay = [], []
    skip = ("cls_token", "pos_embed", "dist_token", "reg_token", "position_embeddings", "distillation_token")
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(skip) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def finetune(cfg: TrainConfig, console=None, bad_images=None) -> dict:
    """Run the fine-tune described by ``cfg``; returns the final metrics. ``bad_images``: a
    :class:`evit_cli.data.BadImages` that skips and counts undecodable images (default: stop at one)."""
    from .data import make_loader
    from .distill import training_loss

    d = init_distributed(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = _resolve_device(cfg.device, d)
    show = console is not None and d.main
    _check(cfg)
    out, train_dir = run_folders(cfg)
    resuming = _start_folders(cfg, out, train_dir, d)
    ckpt.seed_all(cfg.seed + d.rank)
    s = prepare(cfg, device)  # user mistakes in the model, data, head or teacher stop here, before any file
    if not resuming and d.main:
        _create_folders(cfg, out, train_dir)
    model, adapter, teacher, labelled = s.model, s.adapter, s.teacher, s.data.labelled
    evit_cfg = get_config(model)
    train_ds, val_ds, sampler, val_sampler = _datasets(cfg, s, d, bad_images)
    micro_per_epoch = (sampler.per_rank // cfg.batch_size) if sampler else cfg.steps_per_epoch * cfg.accum_steps
    steps_per_epoch = cfg.steps_per_epoch or micro_per_epoch // cfg.accum_steps
    if steps_per_epoch < 1:
        raise EvitError(f"the training split is too small for --batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps}")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    global_batch = cfg.batch_size * cfg.accum_steps * d.world
    base_lr, min_lr, lr_note = resolve_lr(cfg, global_batch)
    notes = [f"head {head_note(s)}", f"loss: {s.loss}"] + ([lr_note] if lr_note else [])

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=adapter.num_classes(model))
    optimizer = _optimizer(model, cfg, base_lr)
    use_scaler = cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    step, start_epoch, start_in_epoch = 0, 0, 0
    if resuming:
        state = torch.load(train_dir / ckpt.CHECKPOINT, map_location="cpu", weights_only=True)
        if state["total_steps"] != total_steps:
            raise EvitError(f"{out} was started with {state['total_steps']} steps, these settings give {total_steps}: resume with the same settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, start_epoch, start_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        ckpt.set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        if d.main:  # the logs and progress.json say what the checkpoint holds, no more
            ckpt.truncate_log(out / STEP_LOG, step, "step")
            ckpt.truncate_log(out / METRICS_LOG, start_epoch + 1, "epoch")
            ckpt.write_progress(train_dir, state)
    if d.world > 1:
        dist.barrier()

    net = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state(epoch: int, in_epoch: int) -> dict:
        rngs = [ckpt.rng_state()]
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": {"step": step, "total_steps": total_steps, "warmup_steps": warmup_steps, "base_lr": base_lr},
            "epoch": epoch, "step": step, "step_in_epoch": in_epoch, "total_steps": total_steps, "rng": rngs,
        }

    def rates_lr(at: int):
        return (keep_rates_at(at, evit_cfg.keep_rates, steps_per_epoch, cfg),
                lr_at(at, total_steps, warmup_steps, base_lr, min_lr))

    progress = _progress(show, console)
    history: list[dict] = []
    with progress:
        for epoch in range(start_epoch, num_epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            steps_this_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            train_ds.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch, first * cfg.batch_size * cfg.accum_steps)
            loader = make_loader(train_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=sampler,
                                 drop_last=True, seed=cfg.seed + epoch)
            if sampler is None and first:  # a stream cannot seek: read past the batches already done
                loader = itertools.islice(loader, first * cfg.accum_steps, None)
            task = progress.add_task(f"epoch {epoch + 1}/{num_epochs}", total=steps_this_epoch, completed=first,
                                     unit="steps")
            net.train()
            in_epoch, micro, t0, seen, loss_sum = first, 0, time.perf_counter(), 0, 0.0
            for images, target in loader:
                if in_epoch >= steps_this_epoch:
                    break
                rates, lr = rates_lr(step)
                adapters.set_keep_rates(model, rates)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, target = mixup_fn(images, target if labelled else torch.zeros_like(target))
                sync = (micro + 1) % cfg.accum_steps == 0
                ctx = net.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
                guide = s.oracle.guiding(images) if s.oracle is not None else contextlib.nullcontext()
                with ctx, autocast(device, cfg.amp), guide as oracle_out:
                    logits = adapter.logits(model, net(images)).float()
                    t_logits = _teacher_logits(teacher, s.oracle, oracle_out, images)
                    loss = training_loss(logits, target, t_logits, labelled=labelled, alpha=cfg.distill_alpha,
                                         tau=cfg.distill_tau, smoothing=cfg.smoothing) / cfg.accum_steps
                scaler.scale(loss).backward()
                loss_sum += loss.item()
                seen += images.shape[0]
                micro += 1
                if not sync:
                    continue
                if not math.isfinite(loss_sum):
                    raise EvitError(f"the loss became {loss_sum} at step {step}: lower --lr or turn off --amp")
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                ips = seen * d.world / (time.perf_counter() - t0)
                if d.main:
                    ckpt.append(out / STEP_LOG, {"step": step, "epoch": epoch, "lr": lr, "keep_rate": rates, "loss": loss_sum})
                progress.update(task, advance=1, loss=loss_sum, lr=lr, keep=",".join(f"{r:.3f}" for r in rates), ips=ips)
                step += 1
                in_epoch += 1
                loss_sum = 0.0
                if cfg.save_every and step % cfg.save_every == 0 and in_epoch < steps_this_epoch:
                    state = checkpoint_state(epoch, in_epoch)
                    if d.main:
                        ckpt.save(train_dir, state)
            progress.remove_task(task)
            metrics = evaluate(net, model, adapter, val_ds, val_sampler, cfg, device, d, teacher)
            rates, lr = rates_lr(max(step - 1, 0))
            metrics.update(epoch=epoch + 1, step=step, keep_rate=rates, lr=lr, split=s.data.val_source)
            history.append(metrics)
            state = checkpoint_state(epoch + 1, 0)
            if d.main:
                ckpt.append(out / METRICS_LOG, metrics)
                ckpt.save(train_dir, state)
                if show:
                    console.print(f"epoch {epoch + 1}/{num_epochs}: {describe_metrics(metrics)}", highlight=False)
    adapters.set_keep_rates(model, evit_cfg.keep_rates)
    final = history[-1] if history else json.loads((out / METRICS_LOG).read_text().splitlines()[-1])
    if s.oracle is not None:
        s.oracle.detach()  # the exported model chooses by its own attention, as always
    final = {**final, "head": head_note(s), "loss": s.loss, "notes": notes[2:], "checkpoint_dir": str(train_dir)}
    if d.main:
        record = training_record(cfg, s, final, total_steps=total_steps, global_batch=global_batch, lr=base_lr,
                                 train_images=len(s.data.train) if sampler else None)
        _export(model, out, final, record, cfg, device, console)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def describe_metrics(m: dict) -> str:
    parts = []
    if "agreement" in m:
        parts.append(f"agreement with the teacher {m['agreement']:.2f}%, KL {m['kl']:.4f}")
    if "top1" in m:
        parts.append(f"val loss {m['val_loss']:.4f}, top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%")
    parts.append(f"keep {','.join(f'{r:.3f}' for r in m['keep_rate'])} ({m['images']} images: {m['split']})")
    return "; ".join(parts)


@torch.no_grad()
def evaluate(net, model, adapter, val_ds, val_sampler, cfg: TrainConfig, device, d: Dist, teacher=None) -> dict:
    """On the validation split, summed over ranks: agreement and KL with the teacher when there is
    one, val loss, top-1 and top-5 (%) when there are labels."""
    from .data import make_loader
    from .fidelity import Tally

    net.eval()
    loader = make_loader(val_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=val_sampler)
    tally = Tally()
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        with autocast(device, cfg.amp):
            logits = adapter.logits(model, net(images)).float()
            ref = teacher.logits(images) if teacher is not None else None
        tally.add(logits, ref, target)
    keys = list(tally.sums)
    tally.sums = dict(zip(keys, _all_sum([tally.sums[k] for k in keys], d, device)))
    if tally.sums["images"] == 0:
        raise EvitError("the validation split is empty: give --val-split or a larger --val-fraction")
    return tally.result()


def training_record(cfg: TrainConfig, s: Setup, final: dict, *, total_steps: int, global_batch: int, lr: float,
                    train_images: int | None) -> dict:
    """What the fine-tuned folder says about how it was made (evit.json, model card, info, eval)."""
    t = s.teacher
    return {
        "from": {"model": cfg.model, "checkpoint": cfg.checkpoint,  # pretrained None: a folder's own weights
                 "pretrained": None if Path(cfg.model).is_dir() and not cfg.checkpoint else cfg.pretrained},
        "dataset": cfg.dataset, "train_split": cfg.train_split, "train_images": train_images,
        "labels": s.data.labelled, "loss": s.loss, "head": head_note(s),
        "token_selection": f"oracle: {s.oracle_source}" if s.oracle_source else "own class attention",
        "distillation": None if t is None else {
            "teacher": t.source, "alpha": cfg.distill_alpha if s.data.labelled else 1.0, "tau": cfg.distill_tau},
        "steps": total_steps, "epochs": cfg.epochs, "global_batch": global_batch, "lr": lr,
        "weight_decay": cfg.weight_decay, "img_size": s.adapter.img_size(s.model),
        "metrics_split": f"{final['split']}, {final['images']} images", "previous": s.previous,
    }


def _export(model, out: Path, final: dict, record: dict, cfg: TrainConfig, device, console) -> None:
    """The output folder becomes an exported model, with metrics.json and the bench report."""
    import tempfile

    from . import artifact
    from .report import write_bench

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
        from .bench import bench

        report = bench(model, batch=cfg.bench_batch, device=device.type, reps=5, warmup=1, progress=console is not None)
        write_bench(report, out)


def _progress(enabled: bool, console):
    """Steps of each epoch with loss, lr, keep rate and images/s: a bar on a terminal, timestamped lines otherwise."""
    from .progress import Progress

    return Progress(enabled=enabled, stream=getattr(console, "file", None))
