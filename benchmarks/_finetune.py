"""`evit finetune` as a user runs it, for the benchmarks that recover a model through it
(generalize_real.py, embed_real.py, claims_real.py): the command line, its options, one recovery.

Not a benchmark itself; the scripts import it as ``_finetune`` (their folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT


def add_options(ap: argparse.ArgumentParser, epochs: float | None, epochs_help: str) -> None:
    """The recovery options every such benchmark takes: --epochs (default ``epochs``; None: finetune's own
    default), --train-limit, --workers, --finetune-args."""
    ap.add_argument("--epochs", type=float, default=epochs, help=epochs_help)
    ap.add_argument("--train-limit", type=int, default=None,
                    help="At most N training photos (of each split), evenly spaced. [all]")
    ap.add_argument("--workers", type=int, default=2, help="Loader workers of `evit finetune`. [2]")
    ap.add_argument("--finetune-args", default="",
                    help="Extra `evit finetune` options for every recovery, e.g. \"--lr 1e-5 --mixup 0.8\".")


def finetune(model: list[str], data: Path, out: Path, log: Path, args) -> float:
    """`evit finetune MODEL... --dataset DATA --output OUT` as a user runs it, with ``args.epochs`` (None:
    finetune's default), ``args.workers`` and ``args.finetune_args``; its output in ``log``. Returns the
    seconds it took; a failure is a RuntimeError with the log's last lines."""
    epochs = [] if args.epochs is None else ["--epochs", f"{args.epochs:g}"]
    cmd = [sys.executable, "-m", "evit_cli", "finetune", *model, "--dataset", str(data), "--output", str(out),
           *epochs, "--workers", str(args.workers), "--no-bench", "--overwrite",
           *shlex.split(getattr(args, "finetune_args", "") or "")]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"evit finetune failed ({rc}): {' | '.join(tail)}\ncommand: {shlex.join(cmd)}")
    return time.perf_counter() - t0


def recover(model, data: Path, work: Path, tag: str, args):
    """One recovery in ``work``: ``model`` is an nn.Module (saved to WORK/TAG.start first) or the `evit finetune`
    arguments that name it; the result is WORK/TAG, the log WORK/TAG.log. Returns (the recovered model
    loaded with evit_cli.load, seconds of `evit finetune`)."""
    import evit_cli

    if not isinstance(model, list):
        model = [str(evit_cli.save(model, work / f"{tag}.start"))]
    secs = finetune(model, data, work / tag, work / f"{tag}.log", args)
    return evit_cli.load(work / tag), secs
