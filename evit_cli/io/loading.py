"""Any model the tool takes: an exported EViT folder, a folder in the hub's layout, a timm name
or a hub id; and :func:`convert` for names as well as modules."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..algorithm.config import DEFAULT_LAYERS
from ..algorithm.state import model_state
from ..errors import EvitError
from ..model import convert as core
from . import folder as artifact
from . import hub
from .resolve import create_timm, load_folder, load_hub

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def load_model(
    spec: str | os.PathLike,
    *,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    **kwargs,
) -> nn.Module:
    """Any model the tool takes (see :func:`_load_model`); ``attn_implementation`` (``eager`` or ``sdpa``)
    sets a transformers model's attention and is refused for timm models."""
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise EvitError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got "
                        f"{attn_implementation!r}")
    model = _load_model(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    if attn_implementation is not None:
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise EvitError("--attn-implementation chooses a transformers model's attention: timm models pick "
                            "theirs themselves (fused SDPA where available); drop the option")
        model.set_attn_implementation(attn_implementation)
        model_state(model).source["attn_implementation"] = attn_implementation
    return model


def _load_model(
    spec: str | os.PathLike,
    *,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Any model the tool takes.

    An exported EViT folder; a local folder in the hub's layout (transformers
    ``save_pretrained`` or timm); a timm name; a hub id (``org/name`` for
    transformers or timm, ``hf-hub:org/name`` for timm). ``checkpoint`` gives
    local weights for the named architecture.
    """
    import timm

    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / artifact.META_FILE).is_file():
            if checkpoint is not None or kwargs:
                given = ", ".join(["--checkpoint"] * (checkpoint is not None)
                                  + [f"--{k.replace('_', '-')}" for k in kwargs])
                raise EvitError(f"{path} is an exported folder, which holds its own weights and classes: drop {given}, "
                                "or give the original model name")
            return artifact.load(path)
        if (path / "config.json").is_file():
            return load_folder(path, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
        for name in (artifact.META_FILE, "config.json"):
            if (path / name).is_dir():
                raise EvitError(f"{path / name} is a folder, not a file: export or save the model again")
        raise EvitError(
            f"{path} is a folder without {artifact.META_FILE} or config.json: give a folder written by "
            "`evit convert` or `save_pretrained`, or a model name"
        )
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise EvitError(f"{path} does not exist: give an existing folder, a timm name or a hub id")
    if path.is_file():
        raise EvitError(f"{path} is a file: name the architecture and pass the file as --checkpoint {path}")
    if spec.startswith("hf-hub:") or (not timm.is_model(spec) and spec.count("/") == 1):
        exported = None if spec.startswith("hf-hub:") else hub.from_hub(spec)
        if exported is not None:  # an exported folder pushed to the hub
            return _load_model(exported, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
        return load_hub(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    return create_timm(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)


def convert(
    model: nn.Module | str | os.PathLike,
    keep_rate=0.7,
    layers=DEFAULT_LAYERS,
    fuse: bool = True,
    proportional_attention: bool | None = None,
    method: str = "evit",
    score: str | None = None,
    restore=None,
    **load_kwargs,
) -> nn.Module:
    """Inject EViT reorganization into ``model`` and return it.

    ``model`` is a module (changed in place) or anything :func:`load_model` takes (a timm name, a hub
    id, a folder); ``load_kwargs`` (``pretrained``, ``checkpoint``, ``num_classes``, ...) go to the
    loader. ``keep_rate`` is one rate or one per layer; ``layers`` are 1-based block numbers;
    ``fuse=False`` drops the inattentive tokens instead of fusing them; ``proportional_attention``
    raises each token's attention logit by the log of the patches it holds (``None``: on
    for ``method="squeeze"``, off otherwise). ``method``: ``"evit"`` (the paper's, the default) or
    ``"squeeze"``: each inattentive token is squeezed into its most similar kept token
    (size-weighted average), ranked by class attention times value norm, with proportional attention;
    see docs/algorithm.md. ``score``: what ranks the tokens: ``"cls"`` (the class token's attention, the
    paper's; the default where the model has a class token), ``"mean_query"`` (the attention row of the mean
    query), ``"received"`` (the attention each token receives from all queries; the default without one) or
    ``"probe"`` (an attention-pool head's own query; attention-pooled timm towers, SigLIP); every score but
    ``"cls"`` fuses into the score-weighted mean, see docs/algorithm.md. ``restore``: how a dense-prediction
    model (a timm ViT's ``forward_intermediates(output_fmt="NCHW")``, a transformers backbone, depth or segmentation
    model) puts the removed patches back: ``"delta"`` (the default), ``"reconstruct"`` or ``"fused"``, optionally
    with the softmax temperature and top-k, ``"reconstruct:0.05"``, ``"delta:0.05:8"`` (or a ``RestoreSpec``); kept
    in the saved folder; refused for a transformers classifier, which never puts them back (docs/dense.md).
    """
    if not isinstance(model, nn.Module):
        model = load_model(model, **load_kwargs)
    elif load_kwargs:
        raise TypeError(f"loading options ({', '.join(load_kwargs)}) need a model name or folder, not a module")
    return core.convert_module(model, keep_rate=keep_rate, layers=layers, fuse=fuse,
                        proportional_attention=proportional_attention, method=method, score=score, restore=restore)


def is_exported(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a folder written by `evit convert` or `evit finetune`."""
    return (Path(spec) / artifact.META_FILE).is_file()


def pretrained_flag(spec: str | os.PathLike, pretrained: bool | None) -> bool:
    """``pretrained`` as given, pretrained weights when not; refused for an exported folder, whose
    weights are its own."""
    if pretrained is not None and is_exported(spec):
        flag = "--pretrained" if pretrained else "--no-pretrained"
        raise EvitError(f"{spec} is an exported folder, which holds its own weights: drop {flag}, "
                        "or give the original model name")
    return True if pretrained is None else pretrained


def load_converted(spec: str | os.PathLike, keep_rate=None, layers=None, fuse: bool | None = None, *,
                   pretrained: bool | None = None, checkpoint: str | os.PathLike | None = None,
                   method: str | None = None, score: str | None = None, restore=None) -> nn.Module:
    """An EViT model from an exported folder (its own settings where not given) or from anything else
    :func:`load_model` takes (converted with the settings given, the defaults for the rest)."""
    model = load_model(spec, pretrained=pretrained_flag(spec, pretrained), checkpoint=checkpoint)
    return core.convert_keeping(model, keep_rate, layers, fuse, method, score, restore)


def source_name(model: nn.Module, spec: str | os.PathLike) -> str:
    """The name of the model ``model`` was built from (an exported folder's source), else ``spec``."""
    return (model_state(model).source or {}).get("model", spec)
