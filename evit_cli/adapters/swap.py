"""The class swap shared by every adapter (like ToMe's patches): a module's class becomes a subclass
with an EViT mixin first, so its parameters and state-dict keys stay those of its library, and the
original class comes back on revert.

A generated class holds nothing but the mixin and the class it extends; what differs between
models (a family's spec, keep rates, positions) lives on the instance (:class:`.block.BlockState`),
so one generated class can serve every family that shares a library class.
"""

from __future__ import annotations

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def original(cls: type) -> type:
    """The library class behind a generated one (``cls`` itself when it is not generated)."""
    return vars(cls).get("_evit_original", cls)


def evit_class(cls: type, mixin: type) -> type:
    """The subclass of ``cls``'s original class with ``mixin`` first, made once per pair."""
    cls = original(cls)
    if (cls, mixin) not in _CLASSES:
        attrs = {"__module__": mixin.__module__, "_evit_original": cls}
        _CLASSES[(cls, mixin)] = type(f"EViT{cls.__name__}", (mixin, cls), attrs)
    return _CLASSES[(cls, mixin)]


def swap_in(module: nn.Module, mixin: type) -> None:
    module.__class__ = evit_class(type(module), mixin)


def swap_out(module: nn.Module) -> None:
    module.__class__ = original(type(module))
