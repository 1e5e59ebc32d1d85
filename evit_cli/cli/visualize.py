"""`evit visualize`: which patches each EViT layer kept and which it fused."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..io import loading
from ..measure.report import kv_table
from ..measure.visualize import visualize as run
from ..utils.files import check_output_file
from . import options as o
from .render import emit, without

EXAMPLE = "Example: evit visualize deit_t_evit photo1.jpg photo2.jpg -o tokens.png"

Model = o.model_argument("Exported folder, or a model `evit convert` takes (converted with -k/-l).")
Images = Annotated[list[Path], typer.Argument(help="Image files (any size: resized with the model's transform).")]
Output = o.output("PNG to write.", kind=Path)


def visualize(
    model: Model, images: Images, output: Output = Path("evit_tokens.png"), keep_rate: o.KeepRate = None,
    layers: o.Layers = None, pretrained: o.Pretrained = None, checkpoint: o.Checkpoint = None,
    as_json: o.AsJson = False, score: o.Score = None,
):
    """Which patches each EViT layer kept and which it fused: one panel per layer, fused patches blanked.

    A panel blanks every patch that no longer has a token of its own after that layer.
    """
    check_output_file(output)
    m = loading.load_converted(model, keep_rate, layers, pretrained=pretrained, checkpoint=checkpoint, score=score)
    result = run(m, [str(p) for p in images], output)
    emit(result, as_json, kv_table(f"wrote {output}", without(result, "images")))
