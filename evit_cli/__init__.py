"""evit: EViT token reorganization for Vision Transformers.

    import evit_cli
    model = evit_cli.convert("deit_small_patch16_224", keep_rate=0.7, layers=(4, 7, 10), pretrained=False)
    evit_cli.save(model, "deit_s_evit")
    model = evit_cli.load("deit_s_evit")
    report = evit_cli.bench(model, batch=64)
    metrics = evit_cli.finetune(evit_cli.TrainConfig(model="deit_s_evit", dataset="./photos", output="deit_s_tuned"))
"""

from ._version import __version__
from .algorithm.config import EViTConfig
from .algorithm.schedule import keep_rate_at
from .algorithm.state import ModelState, model_state
from .errors import EvitError
from .io.folder import load, save
from .io.loading import convert, load_model
from .measure.bench import bench
from .measure.evaluate import evaluate
from .measure.sweep import sweep
from .model.convert import dense_copy, revert, tokens_after_layers
from .train import TrainConfig, finetune

__all__ = [
    "__version__", "EViTConfig", "EvitError", "bench", "convert", "dense_copy", "keep_rate_at", "load", "load_model",
    "ModelState", "model_state",
    "revert", "save", "tokens_after_layers", "evaluate", "sweep", "TrainConfig", "finetune",
]
