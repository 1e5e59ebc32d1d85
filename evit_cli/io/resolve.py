"""Building models from timm names, hub ids and local files, with safe checkpoint loading.

Every model this module builds carries ``model_state(model).source``: what it was
built from and how to build it again (the exported folder stores it).
"""

from __future__ import annotations

import difflib
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..algorithm.state import model_state
from ..errors import EvitError, first_line, is_out_of_memory, memory_message
from ..model.validate import head_fits
from ..utils.files import read_json
from .hub import go_offline_if_unreachable

_WRAPPER_KEYS = ("model_ema", "state_dict_ema", "model", "state_dict", "module")


# --------------------------------------------------------------------------- checkpoints


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code.

    ``.safetensors`` through safetensors; anything else through
    ``torch.load(weights_only=True)``, which refuses pickles that would run code.
    Training checkpoints that wrap the weights (``{"model": ...}``) are unwrapped
    and a DDP ``module.`` prefix is removed.
    """
    path = _weights_file(Path(path))
    kind = _weights_kind(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise EvitError(f"{path} is not a readable safetensors file ({first_line(e)}): "
                            "is it truncated? download it again") from None
    elif kind == "torch":
        sd = _torch_load(path)
    else:
        raise EvitError(f"{path} is not a readable PyTorch checkpoint or safetensors file ({kind}): "
                        "give a .safetensors, .pth, .pt or .bin file of weights")
    for key in _WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EvitError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _weights_file(path: Path) -> Path:
    """``path`` as a weights file; a folder or a missing path is refused with what to give instead."""
    if path.is_dir():
        inside = next((path / n for n in _WEIGHT_NAMES if (path / n).is_file()), None)
        hint = f"give the file inside it (--checkpoint {inside}), or pass the folder as MODEL" if inside else \
            "give the path of a .safetensors, .pth, .pt or .bin file"
        raise EvitError(f"checkpoint {path} is a folder, not a weights file: {hint}")
    if not path.is_file():
        raise EvitError(f"checkpoint {path} does not exist: give the path of a .safetensors, .pth, .pt or .bin file")
    if path.stat().st_size == 0:
        raise EvitError(f"checkpoint {path} is empty (0 bytes): was the download or the copy cut short? get it again")
    return path


def _weights_kind(path: Path) -> str:
    """"safetensors" or "torch" from the file's first bytes (whatever its name), else what it looks like."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= min(path.stat().st_size - 8, 100_000_000):
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive, or its legacy pickle
        return "torch"
    text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
    if path.suffix == ".safetensors" and not text:
        return "safetensors"  # a broken header: safetensors says what is wrong
    return "it holds text" if text else "its first bytes are neither's"


def _torch_load(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EvitError(
            f"refused to load {path}: it holds Python objects beyond tensors, which could run code "
            f"({first_line(e)}); convert it to .safetensors from a trusted environment"
        ) from None
    except Exception as e:  # noqa: BLE001 - a file that is not a checkpoint fails torch.load in many ways
        if is_out_of_memory(e):
            raise
        raise EvitError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                        f"{first_line(e)[:80]}): is it truncated? download it again") from None


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load that reports missing and unexpected keys in one line."""
    own = model.state_dict()
    wrong_type = [k for k in own if k in sd and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if wrong_type:
        raise EvitError(f"{what} holds integer tensors where weights should be float ({_few(wrong_type)}): "
                        "is it a quantized or corrupted file? give float weights")
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
        if is_out_of_memory(e):
            raise EvitError(f"cannot build {name} with {kwargs}: "
                            + memory_message(e, "lower --num-classes or --img-size")) from None
        if not pretrained:
            raise EvitError(f"cannot build {name} with {kwargs}: {first_line(e)}") from None
        why = "the hub cannot be reached and they are not in the local cache" if offline else first_line(e)
        raise EvitError(
            f"could not get pretrained weights for {name} from the Hugging Face hub ({why}): "
            "check the network, or use --no-pretrained for random weights, or --checkpoint FILE"
        ) from None
    if sd is not None:
        load_weights(model, _without_head(model, sd) if kwargs.get("num_classes") == 0 else sd,
                     f"checkpoint {checkpoint}")
    model_state(model).source = {
        "family": "timm",
        "model": name,
        "kwargs": kwargs,
        "pretrained": bool(pretrained),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }
    return model.eval()


def _without_head(model: nn.Module, sd: dict) -> dict:
    """A classifier's weights for the same model built headless (``num_classes=0``): the head's dropped."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    prefixes = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    own = model.state_dict()
    return {k: v for k, v in sd.items() if k in own or not k.startswith(prefixes)}


# --------------------------------------------------------------------------- transformers

TRANSFORMERS_CLASSES = (
    "ViTForImageClassification", "ViTModel",
    "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher", "DeiTModel",
    "ViTMSNModel", "ViTMSNForImageClassification", "ViTMAEModel",
    "Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
    "CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection",
    "BeitModel", "BeitForImageClassification", "Data2VecVisionModel", "Data2VecVisionForImageClassification",
    "MetaClip2VisionModel", "MetaClip2VisionModelWithProjection", "MetaClip2ForImageClassification",
    "ChineseCLIPVisionModel", "OwlViTVisionModel", "Owlv2VisionModel", "BlipVisionModel", "BlipModel", "PixioModel",
    "DINOv3ViTModel", "MLCDVisionModel", "YolosModel", "YolosForObjectDetection",
    # issue 31: towers without a class token, and class-token towers of vision-language models
    "SiglipVisionModel", "SiglipModel", "SiglipForImageClassification", "IJepaModel", "IJepaForImageClassification",
    "Aimv2VisionModel", "Aimv2Model", "AltCLIPVisionModel", "GitVisionModel", "CLIPSegVisionModel", "Blip2VisionModel",
    "InstructBlipVisionModel", "Tipsv2VisionModel", "DPTModel",
    "Siglip2VisionModel", "Siglip2Model", "Siglip2ForImageClassification",  # padded patch sequences
)
# a multimodal checkpoint -> its image tower, which takes images alone and loads the checkpoint's tower weights
_TOWER = {"CLIPModel": "CLIPVisionModelWithProjection", "MetaClip2Model": "MetaClip2VisionModelWithProjection",
          "ChineseCLIPModel": "ChineseCLIPVisionModel", "OwlViTModel": "OwlViTVisionModel",
          "OwlViTForObjectDetection": "OwlViTVisionModel", "Owlv2Model": "Owlv2VisionModel",
          "Owlv2ForObjectDetection": "Owlv2VisionModel"}
# model_type -> the class built when config.json names no supported architecture
_DEFAULT_CLASS = {
    "vit": "ViTForImageClassification", "deit": "DeiTForImageClassification", "vit_msn": "ViTMSNModel",
    "vit_mae": "ViTMAEModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModel", "beit": "BeitModel",
    "data2vec-vision": "Data2VecVisionModel", "metaclip_2": "MetaClip2VisionModelWithProjection",
    "metaclip_2_vision_model": "MetaClip2VisionModel", "chinese_clip": "ChineseCLIPVisionModel",
    "chinese_clip_vision_model": "ChineseCLIPVisionModel", "owlvit": "OwlViTVisionModel",
    "owlvit_vision_model": "OwlViTVisionModel", "owlv2": "Owlv2VisionModel", "owlv2_vision_model": "Owlv2VisionModel",
    "blip": "BlipModel", "blip_vision_model": "BlipVisionModel", "pixio": "PixioModel", "dinov3_vit": "DINOv3ViTModel",
    "mlcd_vision_model": "MLCDVisionModel", "yolos": "YolosModel",
    "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel", "ijepa": "IJepaModel",
    "siglip2": "Siglip2Model", "siglip2_vision_model": "Siglip2VisionModel",
    "aimv2": "Aimv2Model", "aimv2_vision_model": "Aimv2VisionModel", "altclip_vision_model": "AltCLIPVisionModel",
    "git_vision_model": "GitVisionModel", "clipseg_vision_model": "CLIPSegVisionModel",
    "blip_2_vision_model": "Blip2VisionModel", "instructblip_vision_model": "InstructBlipVisionModel",
}


def _transformers_class(config: dict, where: str):
    import transformers

    from ..adapters.transformers.families import DENSE_SUPPORTED, reason, refused_class, supported

    arch = (config.get("architectures") or [None])[0]
    arch = _TOWER.get(arch, arch)
    if refused_class(str(arch)):
        raise EvitError(f"{where}: " + reason(arch, has_cls=False))
    if arch not in TRANSFORMERS_CLASSES + DENSE_SUPPORTED:
        arch = _DEFAULT_CLASS.get(config.get("model_type"))
    if arch is None:
        what = (config.get("architectures") or [config.get("model_type")])[0]
        raise EvitError(f"{where} is a transformers {what!r} model, which evit does not support yet ({supported()})")
    return getattr(transformers, arch)


def _width(config: dict) -> int:
    """The token width a transformers config.json names (a CLIP config: its vision tower's)."""
    vision = config.get("vision_config")
    width = (vision if isinstance(vision, dict) else config).get("hidden_size")
    return width if isinstance(width, int) else 768


def _vision_config(cls, cfg):
    """Image towers (CLIP's and the like) are built from the vision part of a full multimodal config."""
    if "Vision" in cls.__name__ and hasattr(cfg, "vision_config"):
        return cfg.vision_config
    return cfg


def _config_errors() -> tuple[type, ...]:
    """What transformers raises for a folder whose files are there but broken: a truncated or
    empty weights file, a config.json whose values have the wrong types."""
    from safetensors import SafetensorError

    errors: tuple[type, ...] = (OSError, ValueError, TypeError, KeyError, SafetensorError)
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:  # pragma: no cover - older huggingface-hub has no strict configs
        pass
    return errors


def _instantiate(cls, spec: str, *, weights: bool, offline: bool, config_kwargs: dict, attn_implementation):
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        if weights:
            return cls.from_pretrained(spec, local_files_only=offline, ignore_mismatched_sizes=bool(config_kwargs),
                                       **config_kwargs, **extra)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(spec, local_files_only=offline,
                                         **{k: v for k, v in config_kwargs.items() if v is not None})
        return cls._from_config(_vision_config(cls, cfg), **extra)
    except _config_errors() as e:
        if is_out_of_memory(e):
            raise
        raise EvitError(f"cannot load {spec} with transformers ({type(e).__name__}: {' '.join(str(e).split())[:160]}): "
                        "is the folder complete and its config.json intact? download or save it again") from None


def create_transformers(
    spec: str, *, folder: Path, pretrained: bool = True, checkpoint=None, offline: bool = False,
    attn_implementation: str | None = None, **kwargs
) -> nn.Module:
    """A transformers ViT from a local folder or a hub id whose files lie in ``folder``.

    ``attn_implementation`` (``eager`` or ``sdpa``) chooses transformers' attention; default: its own choice.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config = read_json(folder / "config.json", "config.json", fix=_AGAIN)
    if attn_implementation is None and (folder / "evit.json").is_file():  # an exported folder keeps its choice
        source = read_json(folder / "evit.json", "evit.json", fix="export the model again").get("source")
        attn_implementation = source.get("attn_implementation") if isinstance(source, dict) else None
    cls = _transformers_class(config, spec)
    config_kwargs = {}
    if kwargs.get("num_classes") == 0:
        raise EvitError(f"--num-classes 0 (headless) is for timm models; {spec} is a transformers model: save its "
                        "headless class (transformers.AutoModel.from_pretrained(...).save_pretrained(DIR)) "
                        "and give DIR")
    if "num_classes" in kwargs:
        n = kwargs.pop("num_classes")
        head_fits("--num-classes", n, _width(config))
        config_kwargs = {"num_labels": n, "id2label": {i: f"LABEL_{i}" for i in range(n)}, "label2id": None}
    if kwargs:
        raise EvitError(f"{', '.join(kwargs)} cannot be set for a transformers model")
    model = _instantiate(cls, spec, weights=pretrained and checkpoint is None, offline=offline,
                         config_kwargs=config_kwargs, attn_implementation=attn_implementation)
    if checkpoint is not None:
        load_weights(model, load_state_dict(checkpoint), f"checkpoint {checkpoint}")
    model_state(model).source = {
        "family": "transformers",
        "model": str(spec),
        "class": cls.__name__,
        "attn_implementation": model.config._attn_implementation,
        "pretrained": bool(pretrained and checkpoint is None),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }
    proc = folder / "preprocessor_config.json"
    if proc.exists():
        model_state(model).preprocessor = read_json(proc, "preprocessor_config.json", fix=_AGAIN)
    return model.eval()


_AGAIN = "download or save the model again"


# --------------------------------------------------------------------------- hub ids and folders


def _timm_hub_config(config: dict) -> tuple[str, dict]:
    """timm's hub layout (config.json with ``architecture``) -> model name and kwargs."""
    kwargs = dict(config.get("model_args") or {})
    if "num_classes" in config:
        kwargs.setdefault("num_classes", config["num_classes"])
    return config["architecture"], kwargs


def _weights_in(folder: Path) -> Path | None:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_folder(folder: Path, *, pretrained: bool = True, checkpoint=None, **kwargs) -> nn.Module:
    """A local folder in the hub's layout: ``save_pretrained`` (transformers) or timm's ``config.json``."""
    config = read_json(folder / "config.json", "config.json", fix=_AGAIN)
    if "architecture" in config:
        arch, model_kwargs = _timm_hub_config(config)
        weights = checkpoint or (_weights_in(folder) if pretrained else None)
        model = create_timm(arch, pretrained=False, checkpoint=weights, **{**model_kwargs, **kwargs})
        model.pretrained_cfg = {**model.pretrained_cfg, **(config.get("pretrained_cfg") or {})}
        return model
    if "model_type" in config:
        return create_transformers(str(folder), folder=folder, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    raise EvitError(f"{folder / 'config.json'} is neither a transformers nor a timm config")


def load_hub(repo_id: str, *, pretrained: bool = True, checkpoint=None, **kwargs) -> nn.Module:
    """A hub id (``org/name``, or timm's ``hf-hub:org/name``), from the hub or, offline, the local cache."""
    from huggingface_hub import hf_hub_download

    repo = repo_id[len("hf-hub:"):] if repo_id.startswith("hf-hub:") else repo_id
    offline = go_offline_if_unreachable()
    try:
        config_path = Path(hf_hub_download(repo, "config.json", local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - huggingface-hub raises many types for one cause
        if offline:
            raise EvitError(
                f"{repo} is not in the local Hugging Face cache and the hub cannot be reached: connect to "
                "the network once, or download it elsewhere and pass the folder (or --checkpoint FILE)"
            ) from None
        raise EvitError(f"cannot get {repo} from the Hugging Face hub ({first_line(e)}): check the id") from None
    config = read_json(config_path, "config.json", fix="delete it from the Hugging Face cache and download it again")
    if "architecture" in config:  # a timm model on the hub
        arch, model_kwargs = _timm_hub_config(config)
        if pretrained and checkpoint is None:
            try:
                checkpoint = hf_hub_download(repo, "model.safetensors", local_files_only=offline)
            except Exception as e:  # noqa: BLE001
                raise EvitError(f"cannot get the weights of {repo} ({first_line(e)}): "
                                "use --no-pretrained or --checkpoint FILE") from None
        model = create_timm(arch, pretrained=False, checkpoint=checkpoint, **{**model_kwargs, **kwargs})
        model_state(model).source["hub_id"] = repo
        return model
    return create_transformers(repo, folder=config_path.parent, pretrained=pretrained, checkpoint=checkpoint,
                               offline=offline, **kwargs)
