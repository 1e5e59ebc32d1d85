"""The modeling code an exported folder carries: ``Evit<Class>``, transformers' class ``<Class>``
that applies EViT, as its config's ``evit`` entry says, when it is built.

:mod:`.bundle` copies this module (as ``modeling_evit.py``) and its import closure flat into
the folder, and ``config.json``'s ``auto_map`` names the class, so that
``AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)`` (or
``AutoModel`` for a headless model) builds the EViT model where evit is not installed. So this
module imports only the adapter it needs, torch and transformers: nothing of evit's loading, and
no timm (a timm model's TimmWrapper layout ships :mod:`.remote_timm` instead).
"""

from __future__ import annotations

from torch import nn

from ..adapters.base import Adapter
from ..adapters.block import set_restore
from ..adapters.transformers import TRANSFORMERS
from ..algorithm.config import EViTConfig
from ..algorithm.state import model_state

PREFIX = "Evit"


def apply_config(model: nn.Module, adapter: Adapter, config) -> None:
    """Install EViT in ``model`` as ``config.evit`` says (layers, keep rates, fuse, restore); nothing without it."""
    settings = getattr(config, "evit", None)
    if not settings:
        return
    cfg = EViTConfig.from_dict(settings)
    adapter.check(model)
    adapter.apply(model, cfg)
    set_restore(model, cfg.restore_spec)
    model_state(model).config = cfg


def evit_class(name: str, adapter: Adapter, module: str) -> type:
    """``Evit<name>``: the transformers class ``name`` that applies EViT once built."""
    import transformers

    base = getattr(transformers, name, None)
    if not isinstance(base, type) or not issubclass(base, nn.Module):
        raise AttributeError(f"transformers has no model class {name!r}: upgrade transformers")

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_config(self, adapter, config)

    doc = f"transformers' {name} with EViT token reorganization, as ``config.evit`` says."
    cls = type(PREFIX + name, (base,), {"__init__": __init__, "__module__": module, "__doc__": doc})
    _share_key_renaming(base, cls)
    return cls


def _share_key_renaming(base: type, cls: type) -> None:
    """transformers renames older checkpoints' keys on load (ViT-MAE's ``encoder.layer.N.attention.attention.query``
    to ``layers.N.attention.q_proj``), by class name or model type, but skips code it does not ship:
    the subclass is given its base's renaming."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping as get
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping as register
    except ImportError:  # a transformers without renaming
        return
    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    mapping = get(base.__name__) or (get(model_type) if model_type else None)
    if mapping:
        register(cls.__name__, mapping, overwrite=True)


def class_getter(adapter: Adapter, module: str):
    """A module ``__getattr__`` that makes ``Evit<Class>`` on first use, once (PEP 562)."""
    made: dict[str, type] = {}

    def getter(name: str) -> type:
        if not name.startswith(PREFIX) or name == PREFIX:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name not in made:
            made[name] = evit_class(name[len(PREFIX):], adapter, module)
        return made[name]

    return getter


__getattr__ = class_getter(TRANSFORMERS, __name__)
