"""Model-level EViT: convert a model, undo it, describe it."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from .. import adapters
from ..adapters.block import restore_in, set_restore
from ..algorithm.config import DEFAULT_LAYERS, EViTConfig, check_score, make_config
from ..algorithm.reorg import num_kept, token_counts
from ..algorithm.state import model_state
from ..errors import EvitError


def convert_module(model: nn.Module, keep_rate=0.7, layers=DEFAULT_LAYERS, fuse: bool = True,
            proportional_attention: bool | None = None, method: str = "evit", score: str | None = None,
            restore=None) -> nn.Module:
    """Inject EViT reorganization into the module ``model`` (in place) and return it.

    ``keep_rate`` is one rate or one per layer; ``layers`` are 1-based block numbers; ``fuse=False``
    drops the inattentive tokens instead of fusing them; ``proportional_attention`` raises each
    token's attention logit by the log of the patches it holds, as ToMe does (``None``: on for
    ``method="squeeze"``, off otherwise). ``method``: ``"evit"``, the paper's (the default), or
    ``"squeeze"`` (docs/algorithm.md). ``score``: what ranks the tokens (``config.SCORES``; ``None``: class
    attention where the model has a class token, else the class-token-free default). ``restore``: how a
    dense-prediction model puts the removed patches back (``restore.parse_restore``: ``"reconstruct:0.05"``;
    ``None``: the default); refused for a model that never puts them back. (``evit_cli.convert`` also takes names.)
    """
    adapter = adapters.get_adapter(model)
    adapter.check(model)
    cfg = make_config(layers, keep_rate, adapter.depth(model), fuse, proportional_attention, method,
                      _score(adapter, model, score), restore)
    if cfg.restore is not None and not adapter.restores(model):
        raise EvitError(f"restore {cfg.restore.text()!r} has nothing to put back: {type(model).__name__} returns no "
                        "patch map (a classifier or embedding tower; the restore serves dense heads and backbones): "
                        "drop it")
    _check_keeps_tokens(model, cfg)
    adapter.apply(model, cfg)
    set_restore(model, cfg.restore_spec)
    model_state(model).config = cfg
    return model


def _score(adapter, model: nn.Module, score: str | None) -> str:
    """``score``, checked against what can rank ``model`` (``None``: its default)."""
    scores = adapter.scores(model)
    if score is None:
        return scores[0]
    check_score(score)
    if score not in scores:
        why = ("it has no class token" if score == "cls" else
               "it has no attention-pool (MAP) head" if score == "probe" else "its adapter computes only these")
        raise EvitError(f"score {score!r} cannot rank this model's tokens ({why}): use one of {', '.join(scores)}")
    return score


def convert_keeping(model: nn.Module, keep_rate=None, layers=None, fuse: bool | None = None,
                    method: str | None = None, score: str | None = None, restore=None) -> nn.Module:
    """:func:`convert_module`, where what is not given stays as the model already has it (or the defaults)."""
    old = get_config(model)
    return convert_module(
        model,
        keep_rate=keep_rate if keep_rate is not None else (old.keep_rates if old else 0.7),
        layers=layers if layers is not None else (old.layers if old else DEFAULT_LAYERS),
        fuse=fuse if fuse is not None else (old.fuse if old else True),
        proportional_attention=old.proportional if old and old.method == (method or old.method) else None,
        method=method or (old.method if old else "evit"),
        score=score or (old.score if old else None),
        restore=restore if restore is not None else (old.restore if old else None),
    )


def reorganized_as(cfg: EViTConfig) -> dict:
    """The keywords of :func:`convert_module` that reorganize as ``cfg`` does, at other rates or layers."""
    return {"fuse": cfg.fuse, "proportional_attention": cfg.proportional, "method": cfg.method, "score": cfg.score,
            "restore": cfg.restore}


def _check_keeps_tokens(model: nn.Module, cfg: EViTConfig) -> None:
    adapter = adapters.get_adapter(model)
    n, p = adapter.num_tokens(model), adapter.num_prefix_tokens(model)
    for layer, rate, after in zip(cfg.layers, cfg.keep_rates,
                                  [n] + token_counts(n, p, cfg.layers, cfg.keep_rates, cfg.adds_token)):
        if num_kept(after - p, rate) < 1:
            raise EvitError(f"keep rate {rate} at layer {layer} keeps no token out of {after - p}: raise it")


def revert(model: nn.Module) -> nn.Module:
    """Remove EViT from ``model`` (in place): the original dense model again."""
    adapters.get_adapter(model).remove(model)
    model_state(model).config = None
    return model


def dense_copy(model: nn.Module) -> nn.Module:
    """A dense copy of an EViT model, sharing nothing with it."""
    return revert(copy.deepcopy(model))


def get_config(model: nn.Module) -> EViTConfig | None:
    """The model's EViT settings (``None``: dense), with the restore it runs with where it was set on its position
    state by hand (``model_state(model).positions.restore_with``)."""
    cfg = model_state(model).config
    live = restore_in(model) if cfg is not None and adapters.get_adapter(model).restores(model) else None
    if live is not None and live != cfg.restore_spec:
        cfg = dataclasses.replace(cfg, restore=live)
    return cfg


def tokens_after_layers(model: nn.Module) -> list[int]:
    """Sequence length after each EViT layer, for the model's input size."""
    cfg = get_config(model)
    if cfg is None:
        return []
    adapter = adapters.get_adapter(model)
    return token_counts(adapter.num_tokens(model), adapter.num_prefix_tokens(model), cfg.layers, cfg.keep_rates,
                        cfg.adds_token)
