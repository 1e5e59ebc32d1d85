"""The training checkpoint: RNG states, atomic writes, and the logs a resumed run continues.

The checkpoint and ``progress.json`` live in the training folder (``OUTPUT.train`` by default),
beside the exported model, not inside it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EvitError, first_line
from ..utils.files import atomic_file, write_json

CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"
KEYS = ("model", "optimizer", "scaler", "epoch", "step", "step_in_epoch", "total_steps", "rng")
START_AGAIN = "drop --resume and add --overwrite to start again"


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``epoch`` epochs and ``step`` optimizer steps done, ``in_epoch`` of them
    in the epoch under way (0 at an epoch's end)."""

    epoch: int = 0
    step: int = 0
    in_epoch: int = 0

    @classmethod
    def of(cls, state: dict) -> Position:
        return cls(state["epoch"], state["step"], state["step_in_epoch"])

    def first_step(self, epoch: int) -> int:
        """The step of ``epoch`` a run that starts here begins with (0 unless it is this one)."""
        return self.in_epoch if epoch == self.epoch else 0


def save_due(step: int, in_epoch: int, steps_in_epoch: int, every: int) -> bool:
    """Whether ``--save-every`` asks for a checkpoint after ``step`` steps, ``in_epoch`` of them in
    an epoch of ``steps_in_epoch`` (an epoch's end has its own checkpoint)."""
    return bool(every) and step % every == 0 and in_epoch < steps_in_epoch


def read(path: Path) -> dict:
    """The training checkpoint at ``path``, or an EvitError saying why it cannot be resumed from."""
    size = path.stat().st_size
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - EOFError, zip and unpickling errors: all say the same
        what = "is empty (0 bytes)" if size == 0 else f"cannot be read ({type(e).__name__}: {first_line(e)})"
        raise EvitError(f"the checkpoint {path} {what}: it was cut short, or is not one; {START_AGAIN}") from None
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise EvitError(f"{path} is not an evit training checkpoint (no {', '.join(missing)}); {START_AGAIN}")
    if not all(isinstance(state[k], int) and state[k] >= 0 for k in ("epoch", "step", "step_in_epoch", "total_steps")):
        raise EvitError(f"{path} holds a step count that is not a count; {START_AGAIN}")
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": _tuple_to_list(random.getstate()),
    }


def _tuple_to_list(x):
    return [_tuple_to_list(v) for v in x] if isinstance(x, (tuple, list)) else x


def _list_to_tuple(x):
    return tuple(_list_to_tuple(v) for v in x) if isinstance(x, list) else x


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    random.setstate(_list_to_tuple(s["python"]))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save(folder: Path, state: dict) -> None:
    """Write the checkpoint atomically (a kill leaves the last one whole), then ``progress.json``."""
    with atomic_file(folder / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    write_progress(folder, state)


def write_progress(folder: Path, state: dict) -> None:
    write_json(folder / PROGRESS,
               {"epoch": state["epoch"], "step": state["step"], "step_in_epoch": state["step_in_epoch"]})


def append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def kept_rows(lines: list[str], done: int, key: str, name: str = "the log") -> list[str]:
    """The log lines of what a checkpoint holds: rows whose ``key`` is below ``done``.

    A last line that is not JSON was cut by a kill while it was written, after the checkpoint:
    it goes. Any other line that is not a JSON row with ``key`` is an EvitError.
    """
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            row = None
        if not isinstance(row, dict) or not isinstance(row.get(key), int):
            raise EvitError(f"line {i + 1} of {name} is not a row of the run's log; remove it, or {START_AGAIN}")
        if row[key] < done:
            kept.append(line)
    return kept


def log_rows(path: Path, done: int, key: str) -> list[str] | None:
    """:func:`kept_rows` of the log at ``path`` (None when there is none)."""
    if not path.is_file():
        return None
    return kept_rows(path.read_text(errors="replace").splitlines(), done, key, str(path))


def truncate_log(path: Path, done: int, key: str) -> None:
    """Keep the log lines of what the checkpoint holds: rows whose ``key`` is below ``done``."""
    rows = log_rows(path, done, key)
    if rows is not None:
        with atomic_file(path) as tmp:  # a kill while cutting leaves the log whole
            tmp.write_text("".join(r + "\n" for r in rows))
