"""The real DeiT-Tiny in the hub layout of facebook/deit-tiny-patch16-224 converts like the timm path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_export import _onnx_run
from test_transformers import map_timm_blocks, map_timm_embeddings, timm_to_hf

import evit_cli
from evit_cli import adapters
from evit_cli.io.export import export
from evit_cli.io.images import transforms
from evit_cli.io.resolve import load_state_dict

REAL = Path(__file__).resolve().parents[3] / "shared" / "real"
WEIGHTS = REAL / "deit_tiny_patch16_224.safetensors"
HUB = Path(__file__).parents[1] / "hub" / "facebook__deit-tiny-patch16-224"

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="needs ../shared/real")


def hub_folder(dst: Path) -> Path:
    """facebook/deit-tiny-patch16-224's config and legacy preprocessor, with the real timm weights mapped in."""
    shutil.copytree(HUB, dst)
    sd = {k: v.contiguous() for k, v in timm_to_hf(load_state_dict(WEIGHTS), "vit", False).items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def photos(n: int | None = 32) -> list[Path]:
    files = sorted(REAL.glob("imagenette-val/*/*.JPEG"))
    return files if n is None else files[:: max(1, len(files) // n)][:n]


def batch(model, files) -> torch.Tensor:
    tf = transforms(adapters.get_adapter(model).data_config(model), train=False)
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def test_real_deit_tiny_hub_folder_predicts_like_the_timm_path_and_exports(tmp_path):
    hf = evit_cli.convert(hub_folder(tmp_path / "deit-tiny"), keep_rate=0.7, layers=(4, 7, 10))
    tm = evit_cli.convert("deit_tiny_patch16_224", checkpoint=WEIGHTS, keep_rate=0.7, layers=(4, 7, 10))
    assert type(hf).__name__ == "ViTForImageClassification"
    dc = adapters.get_adapter(hf).data_config(hf)  # the legacy file: resize to 256x256, crop 224, bicubic
    assert (dc["input_size"], dc["crop_mode"], dc["crop_pct"], dc["interpolation"]) == ((3, 224, 224), "squash", 0.875,
                                                                                        "bicubic")
    files = photos()
    x = batch(hf, files)
    with torch.no_grad():
        hf_logits, timm_logits = hf(x).logits, tm(x)
    assert evit_cli.tokens_after_layers(hf) == evit_cli.tokens_after_layers(tm) == [140, 100, 72]
    assert torch.equal(hf_logits.argmax(1), timm_logits.argmax(1))  # same pixels: same predictions
    assert (hf_logits - timm_logits).abs().max() < 1e-2  # LayerNorm eps 1e-12 (hub config) vs 1e-6 (timm)
    synsets = sorted({f.parent.name for f in files})
    index = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
             "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701}
    labels = torch.tensor([index[f.parent.name] for f in files])
    assert synsets and (hf_logits.argmax(1) == labels).float().mean() > 0.5  # real weights: mostly right
    r = export(hf, "onnx", tmp_path / "deit-tiny.onnx", check_batches=(1,))
    assert r["tokens_after_layers"] == [140, 100, 72]
    assert (_onnx_run(tmp_path / "deit-tiny.onnx", x[:4]) - hf_logits[:4]).abs().max() < 1e-3


def timm_to_data2vec(sd: dict) -> dict:
    """A timm ViT state dict in transformers' older nested Data2Vec-vision layout (absolute positions, no layer
    scale, class-token pooling), independently of evit_cli. Data2Vec's keys have no bias: dropping timm's key bias
    changes no attention weight (q . b_k is the same for every key of a query, and softmax ignores it)."""
    p = "data2vec_vision"
    names = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
    qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    return {**map_timm_embeddings(sd, p), **map_timm_blocks(sd, f"{p}.encoder.layer", names, qkv, key_bias=False),
            "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}


def data2vec_deit_tiny(attn: str):
    """The real DeiT-Tiny as a dense transformers Data2VecVisionForImageClassification (``attn``: eager or sdpa)."""
    from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification

    cfg = Data2VecVisionConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                               image_size=224, patch_size=16, layer_norm_eps=1e-6, num_labels=1000,
                               use_absolute_position_embeddings=True, use_relative_position_bias=False,
                               use_mean_pooling=False, layer_scale_init_value=0.0, attn_implementation=attn)
    model = Data2VecVisionForImageClassification(cfg).eval()
    model.load_state_dict(timm_to_data2vec(load_state_dict(WEIGHTS)), strict=True)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_real_deit_tiny_weights_in_the_data2vec_layout_keep_what_timm_keeps(attn):
    from evit_cli.adapters import record_kept

    hf = data2vec_deit_tiny(attn)
    tm = evit_cli.convert("deit_tiny_patch16_224", checkpoint=WEIGHTS, keep_rate=0.7, layers=(4, 7, 10))
    x = batch(tm, photos(16))  # the same pixels into both
    with torch.no_grad():
        dense = hf(x).logits
        evit_cli.convert(hf, keep_rate=0.7, layers=(4, 7, 10))
        record_kept(hf), record_kept(tm)
        hf_logits, timm_logits = hf(x).logits, tm(x)
    assert evit_cli.tokens_after_layers(hf) == [140, 100, 72]
    for a, b in zip(adapters.evit_blocks(hf), adapters.evit_blocks(tm)):
        assert torch.equal(a.evit.kept.sort(1).values, b.evit.kept.sort(1).values)  # the same tokens kept
    assert torch.equal(hf_logits.argmax(1), timm_logits.argmax(1))
    assert (hf_logits - timm_logits).abs().max() < 1e-3
    assert (hf_logits - dense).abs().max() > 1e-3  # EViT did change the computation
