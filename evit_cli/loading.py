"""Names, hub ids and local files -> model, with safe checkpoint loading.

Every model this module builds carries ``model.evit_source``: what it was
built from and how to build it again (the exported folder stores it).
"""

from __future__ import annotations

import difflib
import os
import pickle
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import EvitError

_WRAPPER_KEYS = ("model_ema", "state_dict_ema", "model", "state_dict", "module")


# --------------------------------------------------------------------------- hub


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(result and result[0])


def go_offline_if_unreachable() -> bool:
    """Switch huggingface-hub to its offline mode (cache only) when the hub cannot be reached.

    Without this, a download on a machine with no network retries for about a
    minute before failing. Returns True when offline.
    """
    from huggingface_hub import constants

    if not hub_reachable():
        constants.HF_HUB_OFFLINE = True
        return True
    return False


# --------------------------------------------------------------------------- checkpoints


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code.

    ``.safetensors`` through safetensors; anything else through
    ``torch.load(weights_only=True)``, which refuses pickles that would run code.
    Training checkpoints that wrap the weights (``{"model": ...}``) are unwrapped
    and a DDP ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise EvitError(f"checkpoint {path} does not exist: give the path of a .safetensors, .pth, .pt or .bin file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise EvitError(f"{path} is not a readable safetensors file ({_first_line(e)}): is it truncated? download it again") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise EvitError(
                f"refused to load {path}: it holds Python objects beyond tensors, which could run code "
                f"({_first_line(e)}); convert it to .safetensors from a trusted environment"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise EvitError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}): is it truncated?") from None
    for key in _WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EvitError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load that reports missing and unexpected keys in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(sd[k].shape)}, the model wants {tuple(own[k].shape)}")
        raise EvitError(f"{what} does not fit the architecture: {'; '.join(parts)}. Is it the right model name?")
    model.load_state_dict(sd, strict=True)


def _few(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# --------------------------------------------------------------------------- timm


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def create_timm(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """A timm model by name, with pretrained weights, a local checkpoint, or random weights.

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``img_size``, ...)
    and are recorded so that the exported folder can rebuild the model.
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, _timm_names(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `timm.list_models('*vit*')`."
        raise EvitError(f"unknown model {name!r}: not a timm model name, local folder or file.{hint}")
    sd = None
    if checkpoint is not None:
        sd = load_state_dict(checkpoint)
        head = sd.get("head.weight")
        if head is not None and "num_classes" not in kwargs:
            kwargs["num_classes"] = int(head.shape[0])
        pretrained = False
    offline = False
    try:
        if pretrained:
            offline = go_offline_if_unreachable()
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except EvitError:
        raise
    except Exception as e:  # timm surfaces hub failures as many exception types
        if not pretrained:
            raise EvitError(f"cannot build {name} with {kwargs}: {_first_line(e)}") from None
        why = "the hub cannot be reached and they are not in the local cache" if offline else _first_line(e)
        raise EvitError(
            f"could not get pretrained weights for {name} from the Hugging Face hub ({why}): "
            "check the network, or use --no-pretrained for random weights, or --checkpoint FILE"
        ) from None
    if sd is not None:
        load_weights(model, sd, f"checkpoint {checkpoint}")
    model.evit_source = {
        "family": "timm",
        "model": name,
        "kwargs": kwargs,
        "pretrained": bool(pretrained),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }
    return model.eval()


def load_model(
    spec: str | os.PathLike,
    *,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Any model the tool takes: an exported EViT folder, or a timm model name."""
    from . import artifact

    path = Path(spec)
    if path.is_dir():
        if (path / artifact.META_FILE).is_file():
            return artifact.load(path)
        raise EvitError(f"{path} is a folder without {artifact.META_FILE}: give a folder written by `evit convert`, or a model name")
    return create_timm(str(spec), pretrained=pretrained, checkpoint=checkpoint, **kwargs)
