"""The transformers ViT families EViT supports, each a declarative spec, and the honest refusals.

A new family is one :class:`Family` entry: the layer class, where its norms,
attention (``q_proj``/``k_proj``/``v_proj`` + output projection), MLP, dropout,
layer scale and drop path live, how many prefix tokens its embeddings put
first (and keeps last, YOLOS's detection tokens), and whether its attention
carries a relative position bias or rotary position embeddings (RoPE).

Names are attribute paths (``"attention.query"``); a tuple of paths is a chain
of modules applied in order (``("intermediate", "output")``). ``legacy``
families use transformers' older nested layer layout (Data2Vec-vision): the
layer takes ``output_attentions`` and returns a tuple, and its attention module
has no attention interface, so EViT computes the attention itself (eager or
sdpa, as the model's ``attn_implementation`` says). ``explicit_attention``
families (BLIP) compute the softmax themselves whatever the implementation
says: EViT does the same.

Towers whose layers are CLIP's (MetaCLIP 2, Chinese-CLIP, OWL-ViT, OWLv2) share
CLIP's spec; only their name and image processor differ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce

from torch import nn

Path = str | tuple[str, ...]


@dataclass(frozen=True)
class Family:
    name: str                                # what the user knows it as
    norm1: str = "layernorm_before"          # layer attributes, in forward order
    attention: str = "attention"
    norm2: str = "layernorm_after"
    mlp: Path = "mlp"
    q: str = "q_proj"                        # attention attributes
    k: str = "k_proj"
    v: str = "v_proj"
    qkv: str | None = None                   # one fused projection instead of q, k, v (BLIP)
    explicit_attention: bool = False         # the attention computes its softmax itself, always (BLIP)
    attention_returns_output_only: bool = False  # the attention returns its output without the weights (YOLOS)
    head_dim: str = "head_dim"
    config: str = "config"
    out_proj: Path = "o_proj"
    scaling: str | None = "scaling"          # None: head_dim ** -0.5
    attn_dropout: str = "attention_dropout"  # a probability
    dropout: str | None = "dropout"          # applied to each branch's output
    layer_scale: tuple[str, str] | None = None  # modules, parameters or floats multiplying each branch
    drop_path: str | None = None
    prefix: int = 1                          # class token (+ distillation token)
    prefix_config: str | None = None         # config attribute adding prefix tokens (registers)
    pooled_class_tokens: bool = False        # every prefix token is a class token the model pools (Pixio):
                                             # their attention rows, averaged, rank the patches
    suffix_config: str | None = None         # config attribute: tokens kept LAST (YOLOS's detection tokens)
    mid_positions: str | None = None         # vision-model module whose output [i] is added after layer i (YOLOS)
    layer_args: tuple[str, ...] = ("attention_mask",)  # the layer's positional arguments after the hidden states
    rope: bool = False                       # layers get (cos, sin) in ``position_embeddings``, patches rotated
    rope_prefix_rows: int = 0                # prefix tokens with a row of their own in (cos, sin) (MLCD's class)
    relative_position_bias: bool = False     # per-layer and/or shared bias tables (BEiT)
    layer_bias: str = "relative_position_bias"   # the per-layer table, from the layer
    shared_bias: str = "shared_position_bias"    # the shared table, from the vision model
    legacy: bool = False                     # the older nested layout (see the module docstring)
    any_input_size: bool = False             # embeddings interpolate positions to any input size
    padded: bool = False                     # flattened patches padded under a patch mask (SigLIP 2: padding.py)
    processor: str = "ViTImageProcessor"     # transformers' default image processor of the family


VIT = Family("ViT")
CLIP = Family("CLIP vision", norm1="layer_norm1", attention="self_attn", norm2="layer_norm2", out_proj="out_proj",
              scaling="scale", attn_dropout="dropout", dropout=None, processor="CLIPImageProcessor")
FAMILIES: dict[str, Family] = {
    "ViTLayer": VIT,
    "DeiTLayer": Family("DeiT", prefix=2),
    "ViTMSNLayer": Family("ViT-MSN"),
    "ViTMAELayer": Family("ViT-MAE"),
    "Dinov2Layer": Family("DINOv2", norm1="norm1", norm2="norm2", dropout=None,
                          layer_scale=("layer_scale1", "layer_scale2"), drop_path="drop_path",
                          any_input_size=True, processor="BitImageProcessor"),
    "Dinov2WithRegistersLayer": Family("DINOv2 with registers", norm1="norm1", norm2="norm2", dropout=None,
                                       layer_scale=("layer_scale1", "layer_scale2"), drop_path="drop_path",
                                       prefix_config="num_register_tokens", any_input_size=True,
                                       processor="BitImageProcessor"),
    "CLIPEncoderLayer": CLIP,
    "MetaClip2EncoderLayer": replace(CLIP, name="MetaCLIP 2 vision"),
    "ChineseCLIPVisionLayer": replace(CLIP, name="Chinese-CLIP vision", processor="ChineseCLIPImageProcessor"),
    "OwlViTEncoderLayer": replace(CLIP, name="OWL-ViT vision", processor="OwlViTImageProcessor"),
    "Owlv2EncoderLayer": replace(CLIP, name="OWLv2 vision", processor="Owlv2ImageProcessor"),
    "BlipEncoderLayer": replace(CLIP, name="BLIP vision", qkv="qkv", out_proj="projection", attn_dropout="dropout.p",
                                explicit_attention=True, layer_args=(), processor="BlipImageProcessor"),
    "MLCDEncoderLayer": replace(CLIP, name="MLCD vision", layer_args=("position_embeddings", "attention_mask"),
                                rope=True, rope_prefix_rows=1, any_input_size=True),
    # towers with CLIP's layers and a class token (issue 31)
    "AltCLIPEncoderLayer": replace(CLIP, name="AltCLIP vision"),
    "GitVisionEncoderLayer": replace(CLIP, name="GIT vision"),
    "CLIPSegEncoderLayer": replace(CLIP, name="CLIPSeg vision", processor="ViTImageProcessor"),
    "Blip2EncoderLayer": replace(CLIP, name="BLIP-2 vision", qkv="qkv", out_proj="projection",
                                 attn_dropout="attention_dropout", layer_args=(), processor="BlipImageProcessor"),
    "InstructBlipEncoderLayer": replace(CLIP, name="InstructBLIP vision", qkv="qkv", out_proj="projection",
                                        attn_dropout="attention_dropout", layer_args=(),
                                        processor="BlipImageProcessor"),
    "InstructBlipVideoEncoderLayer": replace(CLIP, name="InstructBLIP-Video vision", qkv="qkv", out_proj="projection",
                                             attn_dropout="attention_dropout", layer_args=(),
                                             processor="BlipImageProcessor"),
    "Tipsv2VisionLayer": Family("TIPSv2 vision", norm1="norm1", norm2="norm2", out_proj="o_proj", dropout=None,
                                layer_scale=("layer_scale1", "layer_scale2"), drop_path="drop_path",
                                prefix_config="num_register_tokens", processor="Tipsv2ImageProcessor"),
    # towers without a class token: ranked by a class-token-free score, their pools weigh tokens by patches
    "SiglipEncoderLayer": replace(CLIP, name="SigLIP vision", prefix=0, processor="SiglipImageProcessor"),
    "Siglip2EncoderLayer": replace(CLIP, name="SigLIP 2 vision", prefix=0, padded=True,
                                   processor="Siglip2ImageProcessor"),
    "IJepaLayer": Family("I-JEPA", prefix=0),
    "Aimv2EncoderLayer": replace(CLIP, name="AIMv2 vision", norm1="rms_norm1", attention="attention",
                                 norm2="rms_norm2", mlp="ffn", prefix=0),
    "PixioLayer": Family("Pixio", prefix=0, prefix_config="n_cls_tokens", pooled_class_tokens=True,
                         drop_path="drop_path", processor="BitImageProcessor"),
    "DINOv3ViTLayer": Family("DINOv3", norm1="norm1", norm2="norm2", attn_dropout="dropout", dropout=None,
                             layer_scale=("layer_scale1", "layer_scale2"), drop_path="drop_path",
                             prefix_config="num_register_tokens", rope=True, any_input_size=True,
                             processor="DINOv3ViTImageProcessor"),
    "YolosLayer": Family("YOLOS", mlp=("intermediate", "output.dense", "output.dropout"), dropout=None,
                         q="attention.query", k="attention.key", v="attention.value",
                         head_dim="attention.attention_head_size", config="attention.config",
                         out_proj=("output.dense", "output.dropout"), scaling="attention.scaling",
                         attn_dropout="attention.dropout_prob", attention_returns_output_only=True,
                         suffix_config="num_detection_tokens", mid_positions="encoder.interpolation", layer_args=(),
                         any_input_size=True, processor="YolosImageProcessor"),
    # DPT's own ViT (DPTModel, DPT's depth and segmentation models): ViT's older nested layout, as YOLOS's
    "DPTViTLayer": Family("DPT", mlp=("intermediate", "output.dense", "output.dropout"), dropout=None,
                          q="attention.query", k="attention.key", v="attention.value",
                          head_dim="attention.attention_head_size", config="attention.config",
                          out_proj=("output.dense", "output.dropout"), scaling="attention.scaling",
                          attn_dropout="attention.dropout_prob", attention_returns_output_only=True, layer_args=(),
                          processor="DPTImageProcessor"),
    "BeitLayer": Family("BEiT", layer_scale=("lambda_1", "lambda_2"), drop_path="drop_path",
                        relative_position_bias=True, processor="BeitImageProcessor"),
    "Data2VecVisionLayer": Family("Data2Vec-vision", mlp=("intermediate", "output"), dropout=None,
                                  q="attention.query", k="attention.key", v="attention.value",
                                  head_dim="attention.attention_head_size", config="attention.config",
                                  out_proj=("output.dense", "output.dropout"), scaling=None,
                                  attn_dropout="attention.dropout.p", layer_scale=("lambda_1", "lambda_2"),
                                  drop_path="drop_path", relative_position_bias=True,
                                  layer_bias="attention.attention.relative_position_bias",
                                  shared_bias="encoder.relative_position_bias", legacy=True,
                                  processor="BeitImageProcessor"),
}


def resolve(obj, path: str):
    """``obj``'s attribute at a dotted path; ``None`` where any step is missing."""
    return reduce(lambda o, name: getattr(o, name, None) if o is not None else None, path.split("."), obj)


def module_chain(obj, path: Path):
    """The callable at ``path``: one module, or for a tuple the modules applied in order."""
    if isinstance(path, str):
        return resolve(obj, path)
    mods = [resolve(obj, p) for p in path]

    def chain(x):
        for m in mods:
            x = m(x)
        return x

    return chain

# models whose head needs every patch: converting them would give a wrong shape
MASKED_IMAGE_MODELING = ("ViTForMaskedImageModeling", "DeiTForMaskedImageModeling", "BeitForMaskedImageModeling",
                         "ViTMAEForPreTraining", "Data2VecVisionForMaskedImageModeling")
# models whose head reads a map of every patch (segmentation, backbone feature maps)
DENSE_PREDICTION = ("ForSemanticSegmentation", "Backbone", "ForDepthEstimation", "ForImageSegmentation",
                    "ForDensePrediction", "ForNormalEstimation")
# those evit converts, the removed patches put back for their head (dense.py); the others stay refused
DENSE_SUPPORTED = ("Dinov2Backbone", "Dinov2WithRegistersBackbone", "DepthAnythingForDepthEstimation",
                   "BeitForSemanticSegmentation", "Data2VecVisionForSemanticSegmentation", "BeitBackbone",
                   "UperNetForSemanticSegmentation",  # UperNet: with a backbone of a supported family (BEiT's)
                   "DPTForDepthEstimation", "DPTForSemanticSegmentation",  # DPT: its ViT (hybrid too) or a backbone
                   "DINOv3ViTBackbone", "PixioBackbone")
# models whose head predicts a box from every patch token (open-vocabulary detection)
PER_PATCH_BOXES = ("OwlViTForObjectDetection", "Owlv2ForObjectDetection")
# models that read or write text with the image (captioning, question answering, image-text matching, OCR)
TEXT_AND_IMAGE = ("ForConditionalGeneration", "ForQuestionAnswering", "ForImageTextRetrieval",
                  "VisionEncoderDecoderModel")
NO_CLASS_TOKEN = {  # class-name prefix -> why (SigLIP 2's text tower: its layers are the image tower's)
    "Siglip2TextModel": "SigLIP 2's text tower reads text: convert Siglip2VisionModel or Siglip2Model (image tower)",
}


def refusal(model: nn.Module) -> str:
    """The one-line reason ``model`` cannot be converted (it matched no family)."""
    has_cls = any(n.endswith(("cls_token", "class_embedding")) for n, _ in model.named_parameters())
    return reason(type(model).__name__, has_cls)


def refused_class(name: str) -> bool:
    """True for the transformers classes refused by name alone (their head, or no class token)."""
    dense = name.endswith(DENSE_PREDICTION) and name not in DENSE_SUPPORTED
    return (name in MASKED_IMAGE_MODELING + PER_PATCH_BOXES or dense or name.endswith(TEXT_AND_IMAGE)
            or any(name.startswith(p) for p in NO_CLASS_TOKEN))


def reason(name: str, has_cls: bool) -> str:
    """Why the transformers class ``name`` cannot be converted."""
    if name in MASKED_IMAGE_MODELING:
        return (f"{name} is a masked-image-modeling model: its head reconstructs every patch, so EViT cannot "
                "remove tokens; convert the encoder alone (e.g. ViTModel, BeitModel)")
    if name.endswith(DENSE_PREDICTION) and name not in DENSE_SUPPORTED:
        return (f"{name} predicts from a map of every patch (segmentation or backbone features), and evit puts "
                "removed patches back only for " + ", ".join(DENSE_SUPPORTED) + "; convert the encoder alone "
                "(e.g. BeitModel, Data2VecVisionModel)")
    if name in PER_PATCH_BOXES:
        return (f"{name} predicts a box from every patch token, so EViT cannot remove tokens; convert its image "
                f"tower alone ({name.replace('ForObjectDetection', 'VisionModel')})")
    if name.endswith(TEXT_AND_IMAGE):
        return (f"{name} reads or writes text with the image; evit converts image models: convert its image "
                "encoder on its own (e.g. model.vision_model; save it with save_pretrained to use the CLI)")
    for prefix, why in NO_CLASS_TOKEN.items():
        if name.startswith(prefix):
            return f"{name}: {why}"
    if has_cls:
        return f"{name} is a ViT with a class token, but its layer layout is not supported yet ({supported()})"
    return f"{name} is not a Vision Transformer family evit supports yet ({supported()})"


def supported() -> str:
    return "supported: " + ", ".join(f.name for f in dict.fromkeys(FAMILIES.values())) + ", and timm models"
