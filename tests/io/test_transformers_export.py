"""ONNX and TorchScript export of every supported transformers family, checked against PyTorch."""

from __future__ import annotations

import pytest
import torch
from test_export import _onnx_run
from test_transformers_families import _build, _out

import evit_cli
from evit_cli.io.export import export


# one per layout
@pytest.mark.parametrize("name", ["deit_teacher", "vit_mae", "dinov2_reg_cls", "clip", "beit", "data2vec"])
def test_torchscript_of_every_family_matches_pytorch(name, tmp_path):
    model, _ = _build(name, "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    r = export(model, "torchscript", tmp_path / "m.pt", check_batches=(2,))
    assert r["tokens_after_layers"] == evit_cli.tokens_after_layers(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "m.pt"))(x)
        expected = _out(model, x)
        expected = expected[:, 0] if expected.dim() == 3 else expected  # ViT-MAE exports its class token
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4


# ViT/DeiT: the real DeiT-Tiny test; the positions gathered per image
@pytest.mark.parametrize("name", ["beit_shared", "data2vec_shared"])
def test_onnx_of_beit_matches_pytorch(name, tmp_path):
    """transformers builds an all-visible mask while exporting: the export must not trip on it."""
    model, _ = _build(name, "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    export(model, "onnx", tmp_path / "m.onnx", check_batches=(1,))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = _out(model, x)
        expected = expected[:, 0] if expected.dim() == 3 else expected  # a model without pooler exports its class token
        assert (_onnx_run(tmp_path / "m.onnx", x) - expected).abs().max() < 1e-4
