"""evit: EViT token reorganization for Vision Transformers.

    import evit_cli
    model = evit_cli.convert("deit_small_patch16_224", keep_rate=0.7, layers=(4, 7, 10), pretrained=False)
    evit_cli.save(model, "deit_s_evit")
    model = evit_cli.load("deit_s_evit")
    report = evit_cli.bench(model, batch=64)
"""

__version__ = "0.1.0"

from .artifact import load, save  # noqa: E402
from .bench import bench  # noqa: E402
from .config import EViTConfig  # noqa: E402
from .core import convert, dense_copy, revert, tokens_after_layers  # noqa: E402
from .errors import EvitError  # noqa: E402
from .loading import load_model  # noqa: E402
from .schedule import keep_rate_at  # noqa: E402

__all__ = [
    "EViTConfig", "EvitError", "bench", "convert", "dense_copy", "keep_rate_at", "load", "load_model",
    "revert", "save", "tokens_after_layers",
]
