"""Real hub files: every form of preprocessor_config.json transformers reads, and config.json of each family.

The preprocessing evit derives (timm transform from the data config) is compared with transformers' own
image processor on the same image -- an independent pipeline -- not with evit's own earlier output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evit_cli
from evit_cli import adapters
from evit_cli.io.images import transforms

HUB = Path(__file__).parents[1] / "hub"


def _photo() -> Image.Image:
    """A smooth, non-square picture (so that squash, crop and interpolation choices all show)."""
    y, x = np.mgrid[0:300, 0:420].astype(np.float32)
    rgb = np.stack([127 + 120 * np.sin(x / 37), 127 + 120 * np.cos(y / 29), 127 + 120 * np.sin((x + y) / 53)], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _hf_pixels(folder: Path) -> torch.Tensor:
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(folder))
    return torch.as_tensor(np.asarray(proc(_photo(), return_tensors="pt")["pixel_values"][0]))


def _shrunk(src: Path, dst: Path, layers: int = 2) -> Path:
    """The folder with fewer layers (everything else as published): random weights of the real width."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for part in (cfg, cfg.get("vision_config"), cfg.get("text_config")):
        if part is not None:
            part["num_hidden_layers"] = layers
            for key in ("stage_names", "out_features", "out_indices"):  # backbone fields that name every layer
                part.pop(key, None)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("repo, cls, prefix", [
    ("google__vit-base-patch16-224", "ViTForImageClassification", 1),
    ("facebook__deit-small-patch16-224", "ViTForImageClassification", 1),
    ("facebook__dinov2-small", "Dinov2Model", 1),
    ("facebook__dinov2-small__resaved-5.2.0", "Dinov2Model", 1),  # the same files saved again by transformers 5.2
    ("openai__clip-vit-base-patch16", "CLIPVisionModelWithProjection", 1),  # a CLIP checkpoint: its image tower
])
def test_hub_folder_converts_with_the_preprocessing_transformers_uses(repo, cls, prefix, tmp_path, capsys):
    from test_cli import run

    folder = _shrunk(HUB / repo, tmp_path / repo)
    code, _, err = run(["convert", folder, "--no-pretrained", "-k", "0.7", "-l", "1,2", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    model = evit_cli.load(tmp_path / "out")
    assert type(model).__name__ == cls
    dc = adapters.get_adapter(model).data_config(model)
    expected = _hf_pixels(HUB / repo)
    assert dc["input_size"] == tuple(expected.shape)
    ours = transforms(dc, train=False)(_photo())
    assert (ours - expected).abs().mean() < 2e-4  # a wrong interpolation alone gives > 5e-4
    tokens = (dc["input_size"][1] // (14 if "dinov2" in repo else 16)) ** 2 + prefix
    assert evit_cli.tokens_after_layers(model)[0] == prefix + -(-7 * (tokens - prefix) // 10) + 1
    with torch.no_grad():
        x = torch.randn(1, *dc["input_size"])
        out = model(x)
    assert out is not None


@pytest.mark.parametrize("proc", [
    None,  # no preprocessor_config.json: the family processor's defaults, at the model's own image_size
    {"size": {"height": 40, "width": 40}, "do_resize": True, "image_processor_type": "ViTImageProcessor",
     "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4], "resample": 3},
    {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
     "image_processor_type": "BitImageProcessor", "resample": 2},
    {"size": 36, "crop_size": 32, "do_center_crop": True, "feature_extractor_type": "CLIPFeatureExtractor"},
    {"size": 36, "crop_size": 32, "do_center_crop": True, "feature_extractor_type": "DeiTFeatureExtractor"},
    # the legacy BEiT / Data2Vec-vision form (microsoft/beit-*, facebook/data2vec-vision-*): no crop, reduce_labels
    {"crop_size": 32, "do_center_crop": False, "do_normalize": True, "do_resize": True,
     "feature_extractor_type": "BeitFeatureExtractor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
     "reduce_labels": False, "resample": 2, "size": 32},
])
def test_every_preprocessor_form_matches_the_image_processor(proc, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=32 if proc is None or "crop_size" in proc else 40, patch_size=4,
                                        hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                        intermediate_size=96)).save_pretrained(tmp_path)
    if proc is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc))
    model = evit_cli.load_model(tmp_path, pretrained=False)
    dc = adapters.get_adapter(model).data_config(model)
    if proc is None:
        from transformers import ViTImageProcessor

        # the default processor would hand a 32-pixel model 224-pixel images, which it cannot take
        proc32 = ViTImageProcessor(size={"height": 32, "width": 32})
        expected = torch.as_tensor(np.asarray(proc32(_photo(), return_tensors="pt")["pixel_values"][0]))
        assert dc["input_size"] == (3, 32, 32)
    else:
        expected = _hf_pixels(tmp_path)
    assert dc["input_size"] == tuple(expected.shape)
    assert (transforms(dc, train=False)(_photo()) - expected).abs().mean() < 2e-4


def test_attn_implementation_option_is_kept_and_refused_for_timm(tmp_path, capsys):
    from test_cli import run

    folder = _shrunk(HUB / "facebook__deit-small-patch16-224", tmp_path / "deit")
    for impl in ("eager", "sdpa"):
        code, out, err = run(["convert", folder, "--no-pretrained", "-l", "1,2", "--attn-implementation", impl,
                              "-o", tmp_path / impl, "--json"], capsys)
        assert code == 0, err
        assert evit_cli.load(tmp_path / impl).config._attn_implementation == impl
    code, _, err = run(["convert", "deit_tiny_patch16_224", "--no-pretrained", "--attn-implementation", "eager",
                        "-o", tmp_path / "t"], capsys)
    assert code == 2 and "timm" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["convert", folder, "--no-pretrained", "--attn-implementation", "flash",
                        "-o", tmp_path / "f"], capsys)
    assert code == 2 and "eager, sdpa" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("arch, match", [("ViTForMaskedImageModeling", "masked-image-modeling"),
                                         ("Siglip2TextModel", "text tower"),
                                         ("TimesformerForVideoClassification", "not support yet"),
                                         ("VitDetBackbone", "map of every patch")])
def test_refused_architectures_in_config_json_are_one_line(arch, match, tmp_path):
    cfg = json.loads((HUB / "google__vit-base-patch16-224" / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = [arch], "timesformer" if "Timesformer" in arch else cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(evit_cli.EvitError, match=match) as e:
        evit_cli.load_model(tmp_path, pretrained=False)
    assert "\n" not in str(e.value)
