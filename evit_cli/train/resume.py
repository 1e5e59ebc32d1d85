"""The run folder and resuming: the output folder (the logs, the run's settings, at the end the
exported model) and the training folder (the checkpoint, progress.json), and what a resumed run
checks and restores.

A run killed at any point continues with ``resume=True``: checkpoints are atomic and carry the
optimizer, scaler, step and RNG states; the logs are written before the checkpoint that holds
their rows and are cut back to it on resume, so a resumed run takes the same steps an
uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from ..errors import EvitError
from ..utils.files import write_json
from . import checkpoint as ckpt
from .config import TrainConfig

METRICS_LOG = "metrics.jsonl"
STEP_LOG = "train_log.jsonl"
CONFIG_FILE = "train_config.json"  # the run's settings, in the output folder


def run_folders(cfg: TrainConfig) -> tuple[Path, Path]:
    """The output folder (the exported model) and the training folder (checkpoint, progress)."""
    if not cfg.output:
        raise EvitError("no output folder: give -o/--output")
    out = Path(cfg.output)
    train_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.parent / f"{out.name}.train"
    if cfg.resume and not (train_dir / ckpt.CHECKPOINT).is_file() and (out / ckpt.CHECKPOINT).is_file():
        train_dir = out  # a run started by an earlier version kept its checkpoint inside
    return out, train_dir


def start_folders(cfg: TrainConfig, out: Path, train_dir: Path) -> bool:
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


def create_folders(cfg: TrainConfig, out: Path, train_dir: Path) -> None:
    """A new run: clear what --overwrite replaces, then the output folder with the run's settings."""
    for p in (out, train_dir):
        if p.exists() and any(p.iterdir()):
            shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, asdict(cfg))


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


def _load_weights(run, state: dict) -> None:
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


def restore(run, state: dict) -> None:
    """Continue the run (a :class:`.loop.Run`) from ``state``: weights, optimizer, scaler, step and RNG; the logs and
    progress.json cut back to what it holds, no more."""
    _load_weights(run, state)
    run.start = ckpt.Position.of(state)
    run.step = run.start.step
    ckpt.set_rng_state(state["rng"][min(run.d.rank, len(state["rng"]) - 1)])
    if run.d.main:
        ckpt.truncate_log(run.out / STEP_LOG, run.start.step, "step")
        ckpt.truncate_log(run.out / METRICS_LOG, run.start.epoch + 1, "epoch")
        ckpt.write_progress(run.train_dir, state)


def checkpoint_state(run, epoch: int, in_epoch: int) -> dict:
    """What resuming needs, ``epoch`` epochs and ``in_epoch`` steps into the next done; the RNG
    states of every rank."""
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


def save(run, epoch: int, in_epoch: int) -> None:
    state = checkpoint_state(run, epoch, in_epoch)  # every rank: the RNG states are gathered
    if run.d.main:
        ckpt.save(run.train_dir, state)
