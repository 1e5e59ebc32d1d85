"""Fine-tune an EViT model with the keep-rate schedule of EVIT.md.

Single process or data-parallel under ``torchrun`` (DDP; NCCL on GPUs, gloo
on CPU). Only rank 0 writes files and prints. The run can be killed at any
point and continued with ``resume=True``: checkpoints are atomic and carry the
optimizer, scaler, step and RNG states, and the data order is a function of
(seed, epoch), so a resumed run takes the same steps an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import adapters
from .core import convert_keeping, dense_copy, get_config
from .errors import EvitError
from .fsutil import atomic_file, write_json, write_text
from .schedule import keep_rate_at

CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"
METRICS_LOG = "metrics.jsonl"
STEP_LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Everything a run needs; recipes (YAML) and flags fill it. Epoch counts may be fractional."""

    model: str = ""
    dataset: str = ""
    output: str = ""
    keep_rate: object = None  # one rate or one per layer; None: the model's own, else 0.7
    layers: object = None  # 1-based; None: the model's own, else 4,7,10
    fuse: bool | None = None
    pretrained: bool = True
    checkpoint: str | None = None
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
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1
    # optimisation (defaults: EViT's DeiT-S fine-tune)
    epochs: float = 30
    batch_size: int = 64  # per process
    lr: float | None = None  # absolute; None: lr_per_512 * global batch / 512
    lr_per_512: float = 2e-5
    min_lr: float = 2e-6
    weight_decay: float = 1e-6
    warmup_epochs: float = 0.0
    clip_grad: float | None = None
    accum_steps: int = 1
    amp: bool = False
    seed: int = 0
    device: str | None = None  # None: cuda when available
    # keep-rate schedule
    shrink_start: float = 0.0
    shrink_epochs: float = 0.0
    # distillation
    distill: bool = False
    teacher: str | None = None
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    # bookkeeping
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: end of epoch only
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


# --------------------------------------------------------------------------- RNG state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": list(_tuple_to_list(random.getstate())),
    }


def _tuple_to_list(x):
    return [_tuple_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _list_to_tuple(x):
    return tuple(_list_to_tuple(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    random.setstate(_list_to_tuple(s["python"]))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the run


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _save_checkpoint(out: Path, state: dict) -> None:
    with atomic_file(out / CHECKPOINT) as tmp:  # removed on any failure, a kill included
        torch.save(state, tmp)
    write_json(out / PROGRESS, {"epoch": state["epoch"], "step": state["step"], "step_in_epoch": state["step_in_epoch"]})


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, last_step: int, key: str) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)[key] <= last_step]
        write_text(path, "".join(r + "\n" for r in rows))


def _resolve_device(name: str | None, d: Dist) -> torch.device:
    from .bench import resolve_device

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(name)
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    return dev


def finetune(cfg: TrainConfig, console=None) -> dict:
    """Run the fine-tune described by ``cfg``; returns the final metrics."""
    from .data import ResumableSampler, load_image_data, make_loader, transforms, with_transform
    from .loading import load_model

    d = init_distributed(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = _resolve_device(cfg.device, d)
    show = console is not None and d.main
    out = Path(cfg.output)
    if not cfg.output:
        raise EvitError("no output folder: give -o/--output")
    if cfg.accum_steps < 1 or cfg.batch_size < 1 or cfg.epochs <= 0:
        raise EvitError("--batch-size and --accum-steps must be at least 1 and --epochs above 0")
    resuming = cfg.resume and (out / CHECKPOINT).is_file()
    if cfg.resume and not resuming:
        raise EvitError(f"nothing to resume: {out / CHECKPOINT} does not exist; drop --resume to start")
    if not resuming and out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise EvitError(f"output {out} already exists: choose another -o, pass --resume to continue it, or --overwrite")

    _seed_all(cfg.seed + d.rank)
    # ---- model
    model = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    adapter = adapters.get_adapter(model)
    data = load_image_data(
        cfg.dataset, train_split=cfg.train_split, val_split=cfg.val_split, val_fraction=cfg.val_fraction,
        image_column=cfg.image_column, label_column=cfg.label_column, streaming=cfg.streaming, seed=cfg.seed,
    )
    teacher = None
    if cfg.distill or cfg.teacher:  # the dense model before conversion, or another one
        teacher = dense_copy(load_model(cfg.teacher, pretrained=True) if cfg.teacher else model)
        classes = adapters.get_adapter(teacher).num_classes(teacher)
        if classes != data.num_classes:
            raise EvitError(
                f"the teacher predicts {classes} classes, the data set has {data.num_classes}: "
                "pass --teacher MODEL trained on this data set"
            )
        teacher = teacher.to(device).eval()
    if adapter.num_classes(model) != data.num_classes:
        adapter.reset_head(model, data.num_classes, data.class_names)
    else:
        adapter.set_class_names(model, data.class_names)
    convert_keeping(model, cfg.keep_rate, cfg.layers, cfg.fuse)
    evit_cfg = get_config(model)
    model.to(device)

    # ---- data
    data_config = adapter.data_config(model)
    train_ds = with_transform(data.train, data.image_column, data.label_column,
                              transforms(data_config, train=True, randaugment=cfg.randaugment))
    val_ds = with_transform(data.val, data.image_column, data.label_column, transforms(data_config, train=False))
    if cfg.streaming:
        from datasets.distributed import split_dataset_by_node

        if not cfg.steps_per_epoch:
            raise EvitError("--streaming needs --steps-per-epoch: a stream has no length")
        train_ds = split_dataset_by_node(train_ds.shuffle(seed=cfg.seed, buffer_size=1000), rank=d.rank, world_size=d.world)
        val_ds = split_dataset_by_node(val_ds, rank=d.rank, world_size=d.world)
        sampler = None
        val_sampler = None
    else:
        sampler = ResumableSampler(len(train_ds), seed=cfg.seed, shuffle=True, rank=d.rank, world=d.world)
        val_sampler = ResumableSampler(len(val_ds), seed=0, shuffle=False, rank=d.rank, world=d.world)
    micro_per_epoch = (sampler.per_rank // cfg.batch_size) if sampler else cfg.steps_per_epoch * cfg.accum_steps
    steps_per_epoch = cfg.steps_per_epoch or micro_per_epoch // cfg.accum_steps
    if steps_per_epoch < 1:
        raise EvitError(f"the training split is too small for --batch-size {cfg.batch_size} x --accum-steps {cfg.accum_steps}")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    global_batch = cfg.batch_size * cfg.accum_steps * d.world
    base_lr = cfg.lr if cfg.lr is not None else cfg.lr_per_512 * global_batch / 512

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=data.num_classes)

    # ---- optimisation
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "dist_token", "reg_token", "position_embeddings", "distillation_token")) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=base_lr)
    use_scaler = cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    step, start_epoch, start_in_epoch = 0, 0, 0
    if resuming:
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, start_epoch, start_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        _set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
        if state["total_steps"] != total_steps:
            raise EvitError(f"{out} was started with {state['total_steps']} steps, these settings give {total_steps}: resume with the same settings")
        if d.main:
            _truncate_log(out / STEP_LOG, step, "step")
            _truncate_log(out / METRICS_LOG, start_epoch, "epoch")
    elif d.main:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_json(out / "train_config.json", asdict(cfg))
    if d.world > 1:
        dist.barrier()

    net = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def loss_fn(logits, target, images):
        if target.ndim == 2:  # mixup soft targets
            loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits, target, label_smoothing=cfg.smoothing)
        if teacher is not None:
            with torch.no_grad():
                t_logits = adapters.get_adapter(teacher).logits(teacher, teacher(images)).float()
            tau = cfg.distill_tau
            kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                          reduction="batchmean", log_target=True) * tau * tau
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kl
        return loss

    def checkpoint_state(epoch: int, in_epoch: int) -> dict:
        rngs = [_rng_state()]
        if d.world > 1:
            gathered = [None] * d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": {"step": step, "total_steps": total_steps, "warmup_steps": warmup_steps, "base_lr": base_lr},
            "epoch": epoch, "step": step, "step_in_epoch": in_epoch, "total_steps": total_steps, "rng": rngs,
        }

    progress = _progress(show, console)
    history: list[dict] = []
    with progress:
        for epoch in range(start_epoch, num_epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            steps_this_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            if sampler is not None:
                sampler.set_epoch(epoch, first * cfg.batch_size * cfg.accum_steps)
            else:
                train_ds.set_epoch(epoch)
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
                rates = keep_rates_at(step, evit_cfg.keep_rates, steps_per_epoch, cfg)
                adapters.set_keep_rates(model, rates)
                lr = lr_at(step, total_steps, warmup_steps, base_lr, cfg.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, target = mixup_fn(images, target)
                sync = (micro + 1) % cfg.accum_steps == 0
                ctx = net.no_sync() if (d.world > 1 and not sync) else contextlib.nullcontext()
                with ctx, _autocast(device, cfg.amp):
                    logits = adapter.logits(model, net(images)).float()
                    loss = loss_fn(logits, target, images) / cfg.accum_steps
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
                    _append(out / STEP_LOG, {"step": step, "epoch": epoch, "lr": lr, "keep_rate": rates, "loss": loss_sum})
                progress.update(task, advance=1, loss=loss_sum, lr=lr, keep=",".join(f"{r:.3f}" for r in rates), ips=ips)
                step += 1
                in_epoch += 1
                loss_sum = 0.0
                if cfg.save_every and step % cfg.save_every == 0 and in_epoch < steps_this_epoch:
                    state = checkpoint_state(epoch, in_epoch)
                    if d.main:
                        _save_checkpoint(out, state)
            progress.remove_task(task)
            metrics = evaluate(net, model, adapter, val_ds, val_sampler, cfg, device, d)
            metrics.update(epoch=epoch + 1, step=step, keep_rate=keep_rates_at(max(step - 1, 0), evit_cfg.keep_rates, steps_per_epoch, cfg),
                           lr=lr_at(max(step - 1, 0), total_steps, warmup_steps, base_lr, cfg.min_lr))
            history.append(metrics)
            state = checkpoint_state(epoch + 1, 0)
            if d.main:
                _append(out / METRICS_LOG, metrics)
                _save_checkpoint(out, state)
                if show:
                    console.print(
                        f"epoch {epoch + 1}/{num_epochs}: val loss {metrics['val_loss']:.4f}, top-1 {metrics['top1']:.2f}%, "
                        f"top-5 {metrics['top5']:.2f}%, keep {','.join(f'{r:.3f}' for r in metrics['keep_rate'])}"
                    )
    adapters.set_keep_rates(model, evit_cfg.keep_rates)
    final = history[-1] if history else json.loads((out / METRICS_LOG).read_text().splitlines()[-1])
    if d.main:
        _export(model, out, final, cfg, device, console)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


@torch.no_grad()
def evaluate(net, model, adapter, val_ds, val_sampler, cfg: TrainConfig, device, d: Dist) -> dict:
    """Validation loss, top-1 and top-5 (%), summed over ranks."""
    from .data import make_loader

    net.eval()
    loader = make_loader(val_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=val_sampler)
    loss = c1 = c5 = n = 0.0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        with _autocast(device, cfg.amp):
            logits = adapter.logits(model, net(images)).float()
        loss += F.cross_entropy(logits, target, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        c1 += (top[:, 0] == target).sum().item()
        c5 += (top == target[:, None]).any(dim=-1).sum().item()
        n += target.numel()
    loss, c1, c5, n = _all_sum([loss, c1, c5, n], d, device)
    if n == 0:
        raise EvitError("the validation split is empty: give --val-split or a larger --val-fraction")
    return {"val_loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n, "val_images": int(n)}


def _export(model, out: Path, final: dict, cfg: TrainConfig, device, console) -> None:
    """The output folder becomes an exported model, with metrics.json and the bench report."""
    import tempfile

    from . import artifact
    from .report import write_bench

    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    try:
        artifact.save(model, tmp / "m", extra={"metrics": final})
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
