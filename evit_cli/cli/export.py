"""`evit export` and `evit info`: what is done with an exported folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import EvitError
from ..io import folder as artifact
from ..io import hub
from ..io.export import FORMATS
from ..io.export import export as run
from ..measure.report import kv_table
from ..model import validate
from ..utils.files import check_output_file
from . import options as o
from .render import emit

EXPORT_EXAMPLE = "Example: evit export deit_s_evit --format onnx"
INFO_EXAMPLE = "Example: evit info deit_s_evit"

Format = Annotated[str, typer.Option("--format", "-f",
                                     help="onnx or torchscript (safetensors is what convert writes).")]
Output = o.output("File to write. [default: FOLDER/model.onnx or FOLDER/model.torchscript.pt]")
CheckBatches = Annotated[str, typer.Option(
    "--check-batches", callback=o.BATCHES,
    help="Batch sizes the written file is run at and compared with PyTorch.")]
Overwrite = o.overwrite("Replace the file if it exists.")


def export(
    folder: o.FolderArgument, fmt: Format = "onnx", output: Output = None, check_batches: CheckBatches = "1,8",
    overwrite: Overwrite = False, as_json: o.AsJson = False,
):
    """Export the EViT model to ONNX or TorchScript: fixed token counts, dynamic batch, checked after export."""
    if fmt not in FORMATS:
        raise EvitError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    batches = validate.int_list("--check-batches", check_batches)
    artifact.read_meta(folder)
    target = check_output_file(output or folder / FORMATS[fmt], overwrite)
    model = artifact.load(folder)
    result = run(model, fmt, target, check_batches=batches, overwrite=overwrite)
    emit(result, as_json, kv_table(f"exported {fmt}", result))


InfoFolder = Annotated[Path, typer.Argument(
    help="A folder written by `evit convert` or `evit finetune`, or its hub repo (org/name).")]


def info(folder: InfoFolder, as_json: o.AsJson = False):
    """What an exported folder holds: source, layers, keep rates, token counts, GMACs, metrics if trained."""
    folder = hub.locate(str(folder))
    result = artifact.folder_summary(folder)
    emit(result, as_json, kv_table(f"evit info {folder}", {k: v for k, v in result.items() if v is not None}))
