"""`evit bench`: the dense and the EViT model timed side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EvitError
from ..io import loading
from ..measure.bench import bench as run
from ..measure.bench import compile_mode_of
from ..measure.report import bench_table, write_bench
from ..utils.device import resolve_device
from ..utils.files import check_report_dir
from . import options as o
from .render import emit

EXAMPLE = "Example: evit bench deit_s_evit --batch 256 --report reports/"

Model = o.model_argument("Exported folder, or anything `evit convert` takes (converted on the fly).")
Batch = o.batch("Batch size for throughput.")
Amp = Annotated[bool, typer.Option(
    "--amp", help="Autocast: bf16 where the device has it (CPUs, recent GPUs), else fp16.")]
Onnx = Annotated[bool, typer.Option(
    "--onnx", help="Also export both models to ONNX and time them in ONNX Runtime (CPU, torch's thread count), "
    "side by side.")]
Compile = Annotated[bool, typer.Option("--compile",
                                       help="Also time both models under torch.compile, beside the eager ones.")]
CompileMode = Annotated[Optional[str], typer.Option(
    "--compile-mode", show_default=False,
    help="torch.compile mode (implies --compile): default, reduce-overhead (CUDA graphs), max-autotune. "
         "[default: default]")]
Train = Annotated[bool, typer.Option("--train",
                                     help="Also time a training step (forward, backward, AdamW) of both models.")]
Warmup = Annotated[int, typer.Option("--warmup", callback=o.NON_NEGATIVE_INT,
                                     help="Untimed passes first (compiling happens here).")]
Reps = o.reps("Timed passes per model (batch-1 latency takes 3x as many).")


def _indices(label: str, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in value.split(","))
    except ValueError:
        raise EvitError(f"{label} must be comma-separated block indices from 0 such as 2,5,8,11, "
                        f"got {value!r}") from None


Intermediates = Annotated[Optional[str], typer.Option(
    "--intermediates", callback=o.checked(_indices), show_default=False,
    help="timm models: also time forward_intermediates(output_fmt=NCHW) at these 0-based block indices (the "
         "backbone's maps, for EViT with the removed patches put back: docs/dense.md), side by side, e.g. 2,5,8,11.")]
Report = o.report("Write bench.json and bench.md here (an exported folder gets them inside it).")


def bench(
    model: Model, batch: Batch = 256, device: o.Device = "cpu", amp: Amp = False, compile_: Compile = False,
    compile_mode: CompileMode = None, train: Train = False, onnx: Onnx = False, warmup: Warmup = 2, reps: Reps = 10,
    keep_rate: o.KeepRate = None, layers: o.Layers = None, report: Report = None, as_json: o.AsJson = False,
    intermediates: Intermediates = None, score: o.Score = None, restore: o.Restore = None,
):
    """Dense vs EViT side by side: images/s, latency (batch and batch 1), GMACs, tokens, speedup.

    A model name is built with random weights: weights do not change the speed.
    """
    exported = loading.is_exported(model)
    if report is None and exported:
        report = Path(model)
    if report is not None:
        check_report_dir(report)
    resolve_device(device)
    mode = compile_mode_of(compile_mode or compile_)
    m = loading.load_converted(model, keep_rate, layers, pretrained=None if exported else False,
                               score=score, restore=restore)
    result = run(m, batch=batch, device=device, amp=amp, compile=mode or False, train=train, onnx=onnx, warmup=warmup,
                 reps=reps, progress=True, intermediates=intermediates)
    if report is not None:
        result["report_files"] = [str(p) for p in write_bench(result, report)]
    emit(result, as_json, bench_table(result))
