"""The training checkpoint: RNG states, atomic writes, and the logs a resumed run continues.

The checkpoint and ``progress.json`` live in the training folder (``OUTPUT.train`` by default),
beside the exported model, not inside it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .fsutil import atomic_file, write_json

CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"


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
    write_json(folder / PROGRESS, {"epoch": state["epoch"], "step": state["step"], "step_in_epoch": state["step_in_epoch"]})


def append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: Path, done: int, key: str) -> None:
    """Keep the log lines of what the checkpoint holds: rows whose ``key`` is below ``done``."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)[key] < done]
        path.write_text("".join(r + "\n" for r in rows))
