"""Fine-tune an EViT model with the keep-rate schedule of docs/algorithm.md: the loop and its step.

By default it distils the EViT model from the dense model it was made from: labels are optional
(a flat folder of photos is enough), the head is kept when the data set's classes map onto the
model's, and the settings are the recovery recipe of ``recipes/recover.yaml``.

Single process or data-parallel under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU). Only rank 0
writes files and prints. The run can be killed at any point and continued with ``resume=True``
(:mod:`.resume`): the data order is a function of (seed, epoch) and each image's augmentation of
(seed, epoch, index) (:mod:`.loader`), so a resumed run takes the same steps an uninterrupted one
does, with any number of loader workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import adapters
from ..algorithm.schedule import Schedule
from ..errors import EvitError
from ..measure.metrics import describe
from ..utils.device import amp_dtype, autocast
from . import checkpoint as ckpt
from . import resume
from .config import TrainConfig
from .loader import epoch_loader, mixed, training_sets
from .record import export, training_record
from .setup import (
    Dist,
    Setup,
    check_data,
    head_note,
    init_distributed,
    make_optimizer,
    plan_schedule,
    prepare,
    run_device,
)
from .validation import evaluate


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
    bad_images: object = None  # an io.images.BadImages that skips and counts undecodable images, or None
    net: nn.Module | None = None  # the model, or its DDP wrapper
    start: ckpt.Position = field(default_factory=ckpt.Position)
    step: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class Trained:
    """What a fine-tune gives back: its final metrics, and the trained EViT model (the output folder
    holds it exported) on the device it trained on."""

    metrics: dict
    model: nn.Module
    device: torch.device


def finetune(cfg: TrainConfig, console=None, bad_images=None) -> dict:
    """Run the fine-tune described by ``cfg``; returns the final metrics. The output folder becomes
    the exported model (benchmark it with :func:`evit_cli.bench`, as ``evit finetune`` does).
    ``console``: a rich console for the progress (None: quiet); ``bad_images``: a
    :class:`evit_cli.io.images.BadImages` that skips and counts undecodable images (default: stop at one)."""
    return train(cfg, console, bad_images).metrics


def train(cfg: TrainConfig, console=None, bad_images=None) -> Trained:
    """:func:`finetune`, giving back the trained model too."""
    d = init_distributed(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = start(cfg, d, run_device(cfg.device, d), bad_images)
    show = console is not None and d.main
    progress = _progress(show, console)
    with progress:
        for epoch in range(run.start.epoch, run.sched.num_epochs):
            _train_epoch(run, epoch, progress)
            _end_epoch(run, epoch, console if show else None)
    final = _finish(run)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return Trained(final, run.s.model, run.device)


def start(cfg: TrainConfig, d: Dist, device: torch.device, bad_images=None) -> Run:
    """Check and build everything, resuming when asked; the first file is written only when all of
    it is known good (user mistakes in the model, data, head, teacher or checkpoint stop before)."""
    cfg.check()
    out, train_dir = resume.run_folders(cfg)
    state = resume.read_resume(cfg, out, train_dir) if resume.start_folders(cfg, out, train_dir) else None
    ckpt.seed_all(cfg.seed + d.rank)
    s = prepare(cfg, device)
    check_data(s)
    loaders = training_sets(cfg, s, d, bad_images)
    sched, lr_note = plan_schedule(cfg, s, loaders[2], d)
    if state is None and d.main:
        resume.create_folders(cfg, out, train_dir)
    optimizer = make_optimizer(s.model, cfg, sched.base_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"
                                  and amp_dtype(device) == torch.float16)
    notes = [lr_note] if lr_note else []
    run = Run(cfg, d, device, s, out, train_dir, sched, loaders, optimizer, scaler, notes, bad_images)
    if state is not None:
        resume.restore(run, state)
    if d.world > 1:
        dist.barrier()
    run.net = s.model
    if d.world > 1:
        run.net = nn.parallel.DistributedDataParallel(s.model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    return run


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
    for images, target in epoch_loader(run.cfg, run.loaders, epoch, first):
        if tally.in_epoch >= steps:
            break
        rates, lr = run.sched.at(run.step)
        if _forward_backward(run, images, target, rates, lr, tally):
            _optimizer_step(run, tally)
            _log_step(run, epoch, rates, lr, tally, progress, task)
            if ckpt.save_due(run.step, tally.in_epoch, steps, run.cfg.save_every):
                resume.save(run, epoch, tally.in_epoch)
    progress.remove_task(task)
    if tally.in_epoch == first < steps:
        _no_batch(epoch, run.bad_images)


def _no_batch(epoch: int, bad_images=None):
    if bad_images is not None and bad_images.count:
        raise EvitError(f"epoch {epoch + 1} took no step: all {bad_images.count} images it read could not be decoded "
                        "and were skipped; check the data set")
    raise EvitError(f"epoch {epoch + 1} took no step: the training split gave no batch; check the data set")


def _teacher_outputs(teacher, oracle, oracle_out, images):
    """The teacher's output for this batch; when the teacher is the oracle, from the forward it already ran."""
    if teacher is None:
        return None
    if oracle is not None and oracle.teacher is teacher.model:
        return teacher.from_output(oracle_out)
    return teacher.outputs(images)


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
        out = s.adapter.output(s.model, s.adapter.run(run.net, images)).float()  # SigLIP 2: patchified
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
        ckpt.append(run.out / resume.STEP_LOG,
                    {"step": run.step, "epoch": epoch, "lr": lr, "keep_rate": rates, "loss": tally.loss})
    progress.update(task, advance=1, loss=tally.loss, lr=lr, keep=",".join(f"{r:.3f}" for r in rates), ips=ips)
    run.step += 1
    tally.in_epoch += 1
    tally.loss = 0.0


def _end_epoch(run: Run, epoch: int, console) -> None:
    """Validation, the epoch's metrics row, and the end-of-epoch checkpoint."""
    s = run.s
    _, val_ds, _, val_sampler = run.loaders
    metrics = evaluate(run.net, s.model, val_ds, val_sampler, run.cfg, run.device, s.teacher, run.bad_images)
    rates, lr = run.sched.after(run.step)
    metrics.update(epoch=epoch + 1, step=run.step, keep_rate=rates, lr=lr, split=s.data.val_source)
    run.history.append(metrics)
    state = resume.checkpoint_state(run, epoch + 1, 0)
    if run.d.main:
        ckpt.append(run.out / resume.METRICS_LOG, metrics)
        ckpt.save(run.train_dir, state)
        if console is not None:
            console.print(f"epoch {epoch + 1}/{run.sched.num_epochs}: {describe(metrics)}", highlight=False)


def _finish(run: Run) -> dict:
    """The final metrics; on the main process, the output folder becomes the exported model."""
    s, cfg = run.s, run.cfg
    adapters.set_keep_rates(s.model, list(run.sched.keep_targets))
    final = (run.history[-1] if run.history
             else json.loads((run.out / resume.METRICS_LOG).read_text().splitlines()[-1]))
    if s.oracle is not None:
        s.oracle.detach()  # the exported model chooses by its own attention, as always
    final = {**final, "head": head_note(s), "loss": s.loss, "notes": run.notes, "checkpoint_dir": str(run.train_dir)}
    if run.d.main:
        sampler = run.loaders[2]
        record = training_record(cfg, s, final, total_steps=run.sched.total_steps,
                                 global_batch=cfg.batch_size * cfg.accum_steps * run.d.world, lr=run.sched.base_lr,
                                 train_images=len(s.data.train) if sampler else None)
        export(s.model, run.out, final, record)
    return final


def _progress(enabled: bool, console):
    """Steps of each epoch with loss, lr, keep rate and images/s: a bar on a terminal, timestamped lines otherwise."""
    from ..utils.progress import Progress

    return Progress(enabled=enabled, stream=getattr(console, "file", None))
