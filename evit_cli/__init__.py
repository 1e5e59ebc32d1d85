"""evit: EViT token reorganization for Vision Transformers.

    import evit_cli
    model = evit_cli.convert("deit_small_patch16_224", keep_rate=0.7, layers=(4, 7, 10), pretrained=False)
    evit_cli.save(model, "deit_s_evit")
    model = evit_cli.load("deit_s_evit")
    report = evit_cli.bench(model, batch=64)
"""

from ._version import __version__
from .artifact import load, save
from .bench import bench
from .config import EViTConfig
from .core import dense_copy, revert, tokens_after_layers
from .errors import EvitError
from .loading import convert, load_model
from .schedule import keep_rate_at

__all__ = [
    "__version__", "EViTConfig", "EvitError", "bench", "convert", "dense_copy", "keep_rate_at", "load", "load_model",
    "revert", "save", "tokens_after_layers",
]
