"""`evit convert`: inject EViT into a model and write the exported folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import adapters
from ..algorithm.config import DEFAULT_LAYERS
from ..errors import EvitError
from ..io import folder as artifact
from ..io import hub, loading
from ..measure.bench import model_summary
from ..measure.report import kv_table
from ..model import convert as core
from ..model import validate
from ..model.macs import match_macs as match_macs_to
from ..utils import files as fsutil
from . import options as o
from .render import emit

EXAMPLE = "Example: evit convert deit_small_patch16_224 --keep-rate 0.7 --layers 4,7,10 -o deit_s_evit"

Model = o.model_argument("timm name, hub id (google/vit-base-patch16-224, hf-hub:timm/...), local folder, "
                         "or an exported folder.")
Fuse = o.fuse("Fuse the inattentive tokens into one token, or drop them. [default: fuse, or an exported folder's own]")
Pretrained = o.pretrained("Download pretrained weights, or start from random ones (not for an exported folder). "
                          "[default: pretrained]")
Checkpoint = o.checkpoint("Local weights (.safetensors, .pth, .pt, .bin) for MODEL (not for an exported folder).")
NumClasses = Annotated[Optional[int], typer.Option(
    "--num-classes", callback=o.NON_NEGATIVE_INT,
    help="Classifier size; 0: headless, the embedding (timm models; a checkpoint's head is dropped). Not for an "
         "exported folder. [default: the model's or the checkpoint's]")]
MatchMacs = Annotated[Optional[int], typer.Option(
    "--match-macs", callback=o.POSITIVE_INT,
    help="Pick the keep rate whose MACs come closest to the dense model at this resolution, without exceeding them.")]
Output = o.output("Folder to write (default: MODEL_evit).")
Overwrite = o.overwrite("Replace the output folder if it exists.")
PushToHub = Annotated[Optional[str], typer.Option("--push-to-hub",
                                                  help="Also upload the folder to this hub repo (org/name).")]
AttnImplementation = Annotated[Optional[str], typer.Option(
    "--attn-implementation", help="transformers models: eager or sdpa attention (default: the model's own).")]

Layout = Annotated[Optional[str], typer.Option(
    "--layout", show_default=False,
    help="timm models: timm (its own) or transformers (TimmWrapper: loads with transformers' AutoModel* and "
         "trust_remote_code, without evit). [default: the model's own]")]


def convert(
    model: Model, keep_rate: o.KeepRate = None, layers: o.Layers = None, fuse: Fuse = None,
    pretrained: Pretrained = None, checkpoint: Checkpoint = None, num_classes: NumClasses = None,
    img_size: o.ImgSize = None, match_macs: MatchMacs = None, output: Output = None, overwrite: Overwrite = False,
    push_to_hub: PushToHub = None, as_json: o.AsJson = False, attn_implementation: AttnImplementation = None,
    layout: Layout = None, method: o.Method = None, score: o.Score = None, restore: o.Restore = None,
):
    """Inject EViT into a ViT and export it: model.safetensors + evit.json."""
    output = output or Path(f"{Path(model).name}_evit")
    fsutil.check_output_dir(output, overwrite)
    artifact.check_layout(layout)
    if match_macs is not None and keep_rate is not None:
        raise EvitError("--match-macs picks the keep rate: drop --keep-rate, or drop --match-macs")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    m = loading.load_model(model, pretrained=loading.pretrained_flag(model, pretrained), checkpoint=checkpoint,
                           attn_implementation=attn_implementation, **kwargs)
    if img_size is not None:
        validate.image_size("--img-size", m, img_size)
        adapters.get_adapter(m).set_img_size(m, img_size)
    if match_macs is not None:
        validate.image_size("--match-macs", m, match_macs)
        old = core.get_config(m)
        match_macs_to(m, match_macs, layers or (old.layers if old else DEFAULT_LAYERS), True if fuse is None else fuse,
                      method or (old.method if old else "evit"), score or (old.score if old else None),
                      restore or (old.restore if old else None))
    else:
        core.convert_keeping(m, keep_rate, layers, fuse, method, score, restore)
    summary = model_summary(m)
    if match_macs is not None:
        summary["matched_to"] = f"dense @{match_macs}px"
    artifact.save(m, output, overwrite=overwrite,
                  extra={"gmacs_dense": summary["gmacs_dense"], "gmacs": summary["gmacs_evit"]}, layout=layout)
    summary["output"] = str(output)
    if push_to_hub:
        summary["hub_url"] = hub.push_to_hub(output, push_to_hub)
    emit(summary, as_json, kv_table(f"converted -> {output}", summary))
