"""Progress of long work, with an ETA, on stderr (stdout stays for results and JSON).

On a terminal: a rich bar per task. Otherwise (a log file, ``nohup``, a pipe):
plain timestamped lines, one every ``EVIT_PROGRESS_INTERVAL`` seconds (15 by
default) and one when a task that printed any ends, e.g.
``[12:03:04] eval: 384/3925 images, 12.1 images/s, ETA 4m53s``.

    with Progress() as p:
        with p.task("eval", total=3925, unit="images") as advance:
            for batch in loader:
                ...
                advance(len(batch))
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

INTERVAL_ENV = "EVIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 15.0


def duration(seconds: float) -> str:
    """4m53s, 1h02m, 12s."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    return str(v)


@dataclass
class _Task:
    description: str
    total: int | None
    unit: str
    completed: float = 0
    start_completed: float = 0
    started: float = field(default_factory=time.monotonic)
    fields: dict = field(default_factory=dict)
    rich_id: int | None = None
    printed: bool = False

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.completed - self.start_completed) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> str:
        rate = self.rate()
        if not self.total or rate <= 0:
            return "ETA ?"
        return f"ETA {duration((self.total - self.completed) / rate)}"

    def info(self) -> str:
        return ", ".join(f"{k} {_value(v)}" for k, v in self.fields.items())

    def line(self, done: bool = False) -> str:
        count = f"{self.completed:g}/{self.total}" if self.total else f"{self.completed:g}"
        parts = [f"{self.description}: {count} {self.unit}", f"{self.rate():.3g} {self.unit}/s"]
        parts.append(f"done in {duration(time.monotonic() - self.started)}" if done else self.eta())
        if self.fields:
            parts.append(self.info())
        return f"[{time.strftime('%H:%M:%S')}] " + ", ".join(parts)


class Progress:
    """Tasks with a known total, shown on ``stream`` (stderr) while a ``with`` block runs.

    ``enabled=False`` shows nothing (library calls, other ranks).
    """

    def __init__(self, enabled: bool = True, stream=None, interval: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        if interval is None:
            interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
        self.interval = interval
        self._tasks: dict[int, _Task] = {}
        self._next_id = 0
        self._last_line = time.monotonic()
        self._rich = None

    def __enter__(self) -> "Progress":
        if self.interactive:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}", markup=False), TextColumn("ETA", markup=False),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False),
                console=Console(file=self.stream, markup=False, highlight=False), transient=True,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None

    def add_task(self, description: str, total: int | None, completed: float = 0, unit: str = "steps",
                 **fields) -> int:
        task = _Task(description, total, unit, completed, completed, fields=dict(fields))
        task_id, self._next_id = self._next_id, self._next_id + 1
        self._tasks[task_id] = task
        if self._rich is not None:
            task.rich_id = self._rich.add_task(description, total=total, completed=completed, rate="", info=task.info())
        return task_id

    def update(self, task_id: int, advance: float = 0, **fields) -> None:
        task = self._tasks[task_id]
        task.completed += advance
        task.fields.update(fields)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(task.rich_id, completed=task.completed, rate=f"{task.rate():.3g} {task.unit}/s",
                              info=task.info())
        elif time.monotonic() - self._last_line >= self.interval:
            task.printed = True
            self._print(task.line())

    def remove_task(self, task_id: int) -> None:
        """The task is over: its last line (without a terminal), or its bar removed."""
        task = self._tasks.pop(task_id)
        if self._rich is not None:
            self._rich.remove_task(task.rich_id)
        elif task.printed:  # work too short for a progress line needs no end line either
            self._print(task.line(done=True))

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "steps"):
        """A task for the ``with`` block; yields ``advance(n=1)``. Its end line only on success."""
        task_id = self.add_task(description, total, unit=unit)
        try:
            yield lambda n=1, **fields: self.update(task_id, n, **fields)
        except BaseException:
            self._tasks.pop(task_id, None)
            raise
        self.remove_task(task_id)

    def track(self, items, description: str, unit: str = "steps"):
        """Iterate over ``items``, one step of a task per item."""
        items = list(items)
        with self.task(description, len(items), unit=unit) as advance:
            for item in items:
                yield item
                advance()

    def _print(self, line: str) -> None:
        self._last_line = time.monotonic()
        self.stream.write(line + "\n")
        self.stream.flush()
