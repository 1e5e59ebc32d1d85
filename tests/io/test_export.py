"""ONNX and TorchScript export: the written file runs and matches PyTorch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_timm
from test_cli import run
from test_transformers import HF_TINY

import evit_cli
from evit_cli.io.export import export


def _onnx_run(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("kind", ["vit", "distilled"])
def test_onnx_of_a_tiny_model_matches_pytorch_at_batch_1_and_8(kind, tmp_path, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm(kind), keep_rate=0.6, layers=(2, 4)), tmp_path / "m")
    code, stdout, err = run(["export", folder, "--format", "onnx", "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["tokens_after_layers"] == evit_cli.tokens_after_layers(evit_cli.load(folder))
    model = evit_cli.load(folder)
    for b in (1, 8):  # independent of the command's own check
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            assert (_onnx_run(folder / "model.onnx", x) - model(x)).abs().max() < 1e-4


def test_onnx_of_deit_small_keep_07_matches_pytorch(tmp_path):
    model = evit_cli.convert("deit_small_patch16_224", keep_rate=0.7, layers=(4, 7, 10), pretrained=False)
    r = export(model, "onnx", tmp_path / "deit_s.onnx")
    assert r["tokens_after_layers"] == [140, 100, 72]
    for b in (1, 8):
        x = torch.randn(b, 3, 224, 224)
        with torch.no_grad():
            assert (_onnx_run(tmp_path / "deit_s.onnx", x) - model(x)).abs().max() < 1e-4


def test_torchscript_of_a_transformers_model(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    hf = evit_cli.convert(ViTForImageClassification(ViTConfig(**HF_TINY, num_labels=4)).eval(), keep_rate=0.5,
                          layers=(3,))
    r = export(hf, "torchscript", tmp_path / "m.pt")
    assert max(r["max_abs_diff"].values()) < 1e-4
    ts = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert (ts(x) - hf(x).logits).abs().max() < 1e-4


def test_info_describes_a_folder(tmp_path, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2,)), tmp_path / "m")
    code, stdout, _ = run(["info", folder, "--json"], capsys)
    assert code == 0
    r = json.loads(stdout)
    assert r["layers"] == [2] and r["tokens"] == [65, 47] and r["source"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3", "beit_base_patch16_224"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_of_position_dependent_families(name, fmt, tmp_path):
    """RoPE (EVA-02, DINOv3) and relative-position bias (BEiT) follow the kept tokens in the exported graph too."""
    from conftest import TINY, randomize

    from evit_cli.io.resolve import create_timm

    model = evit_cli.convert(randomize(create_timm(name, pretrained=False, **dict(TINY, depth=4))), keep_rate=0.5,
                             layers=(2, 3))
    path = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    r = export(model, fmt, path)
    assert r["tokens_after_layers"] == [model.num_prefix_tokens + 33, model.num_prefix_tokens + 18]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = _onnx_run(path, x) if fmt == "onnx" else torch.jit.load(str(path))(x)
        assert (got - model(x)).abs().max() < 1e-4


def _tiny_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=6,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()


@pytest.mark.parametrize("source", ["timm", "transformers"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_squeeze_model_exports_and_matches_pytorch(fmt, source, tmp_path):
    """The squeeze (its similarity, scatter and size bias) traces like the paper's method."""
    model = tiny_timm("vit") if source == "timm" else _tiny_hf_vit()
    evit_cli.convert(model, keep_rate=0.7, layers=(2, 3, 4, 5), method="squeeze")
    report = export(model, fmt, tmp_path / f"m.{fmt}")  # compares the file with PyTorch at batch 1 and 8
    assert report["tokens_after_layers"] == evit_cli.tokens_after_layers(model) == [46, 33, 24, 18]
