"""Folders exported by evit 0.1.0, before the package was laid out in layers, still load and give
the outputs evit 0.1.0 computed (tests/fixtures/exports_0.1.0/README.md says how they were made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_remote_code import run_without_evit

import evit_cli

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "exports_0.1.0"
EXPECTED = json.loads((OLD / "expected.json").read_text())


def _input() -> torch.Tensor:
    return torch.randn(*EXPECTED["input_shape"], generator=torch.Generator().manual_seed(EXPECTED["input_seed"]))


@pytest.mark.parametrize("layout", ["timm", "timm_wrapper", "transformers"])
def test_evit_load_reads_an_old_export_and_predicts_as_then(layout, tmp_path):
    folder = shutil.copytree(OLD / layout, tmp_path / layout)  # the fixture stays as it was written
    model = evit_cli.load(folder)
    with torch.no_grad():
        out = model(_input())
    out = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.allclose(out, torch.tensor(EXPECTED["outputs"][layout]), atol=1e-5)
    assert evit_cli.tokens_after_layers(model)  # EViT is in place, not a dense model


def test_an_old_remote_code_folder_loads_without_evit(tmp_path):
    folder = shutil.copytree(OLD / "transformers", tmp_path / "transformers")
    x = _input()
    torch.save(x, tmp_path / "x.pt")
    out = run_without_evit(f'''
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        y = output(m, torch.load({str(tmp_path / "x.pt")!r}))
        print(type(m).__name__, repr(y.tolist()))
    ''', tmp_path)
    name, values = out.strip().split(" ", 1)
    assert name == "EvitViTForImageClassification"
    assert torch.allclose(torch.tensor(eval(values)), torch.tensor(EXPECTED["outputs"]["transformers"]), atol=1e-5)


def test_an_old_onnx_export_runs_as_the_old_timm_folder():
    from evit_cli.io.export import onnx_session

    session = onnx_session(OLD / "timm.onnx")
    (out,) = session.run(None, {session.get_inputs()[0].name: _input().numpy()})
    assert torch.allclose(torch.from_numpy(out), torch.tensor(EXPECTED["outputs"]["timm"]), atol=1e-4)
