"""A converted dense-prediction model (issue 32) exports and reloads: with evit_cli.load, through transformers'
Auto class with trust_remote_code in a process that cannot import evit_cli, and to ONNX."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
from test_dense import depth_anything, dinov2_backbone  # noqa: E402
from test_dense_more import build, dpt_depth  # noqa: E402
from test_remote_code import run_without_evit  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli import adapters  # noqa: E402
from evit_cli.io import folder as artifact  # noqa: E402


def _pixio():
    model = build("pixio")[0]
    model.pixio.layernorm.load_state_dict(model.layernorm.state_dict())  # transformers 5.25 reloads the two swapped
    return model


MODELS = {  # name -> (builder, image side, remote class, tokens after layers 2 and 3 at keep 0.5)
    "backbone": (dinov2_backbone, 32, "EvitDinov2Backbone", [34, 19]),
    "depth": (depth_anything, 32, "EvitDepthAnythingForDepthEstimation", [34, 19]),
    "dpt": (dpt_depth, 32, "EvitDPTForDepthEstimation", [34, 19]),
    "dinov3": (lambda: build("dinov3")[0], 32, "EvitDINOv3ViTBackbone", [36, 21]),  # 1 + 2 registers
    "pixio": (_pixio, 32, "EvitPixioBackbone", [35, 20]),  # 2 class tokens
    "dpt_hybrid": (lambda: build("dpt_hybrid")[0], 64, "EvitDPTForDepthEstimation", [10, 7]),  # 16 patches
}


def test_dense_models_reload_with_remote_code_without_evit(tmp_path):
    refs = {}
    for name, (builder, side, _, _) in MODELS.items():
        model, x = builder(), torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            dense_out = adapters.get_adapter(model).outputs(model, x)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        folder = evit_cli.save(model, tmp_path / name)
        back = evit_cli.load(folder)
        with torch.no_grad():
            out = adapters.get_adapter(model).outputs(model, x)
            assert torch.equal(adapters.get_adapter(back).outputs(back, x), out)
        assert out.shape == dense_out.shape and (out - dense_out).abs().max() > 1e-3
        meta = json.loads((folder / artifact.META_FILE).read_text())
        refs[name] = {"folder": str(folder), "auto": meta["auto_class"], "evit": out, "dense": dense_out, "x": x}
    assert refs["backbone"]["auto"] == refs["dinov3"]["auto"] == refs["pixio"]["auto"] == "AutoModel"
    assert refs["depth"]["auto"] == refs["dpt"]["auto"] == refs["dpt_hybrid"]["auto"] == "AutoModelForDepthEstimation"
    torch.save({"refs": refs}, tmp_path / "refs.pt")
    out = run_without_evit('''
        import json
        import transformers
        data = torch.load("refs.pt")
        result = {}
        for name, r in data["refs"].items():
            auto = getattr(transformers, r["auto"])
            remote = auto.from_pretrained(r["folder"], trust_remote_code=True).eval()
            dense = type(remote).__mro__[1].from_pretrained(r["folder"]).eval()
            def take(model):
                with torch.no_grad():
                    o = model(r["x"])
                return o.feature_maps[-1] if hasattr(o, "feature_maps") else o.predicted_depth
            result[name] = {"class": type(remote).__name__, "evit": (take(remote) - r["evit"]).abs().max().item(),
                            "dense": (take(dense) - r["dense"]).abs().max().item()}
        print(json.dumps(result))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert {name: r["class"] for name, r in result.items()} == {name: m[2] for name, m in MODELS.items()}
    for name, r in result.items():
        assert r["evit"] < 1e-5 and r["dense"] < 1e-5, (name, r)


@pytest.mark.parametrize("name", [n for n in MODELS if n != "dpt_hybrid"])  # the hybrid: DPT's path, 12 s more
def test_dense_models_export_to_onnx(name, tmp_path):
    """Pixio's two class tokens: the rows of its score are not squeezed (ONNX's Squeeze refuses a dimension of 2)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from evit_cli.io.export import export

    builder, _, _, counts = MODELS[name]
    model = evit_cli.convert(builder(), keep_rate=0.5, layers=(2, 3))
    report = export(model, "onnx", tmp_path / f"{name}.onnx")  # checked against PyTorch on batches 1 and 8
    assert (tmp_path / f"{name}.onnx").is_file() and report["tokens_after_layers"] == counts
