"""A converted dense-prediction model (issue 32) exports and reloads: with evit_cli.load, and through
transformers' Auto class with trust_remote_code in a process that cannot import evit_cli."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
from test_dense import depth_anything, dinov2_backbone  # noqa: E402
from test_remote_code import run_without_evit  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli import adapters  # noqa: E402
from evit_cli.io import folder as artifact  # noqa: E402


def test_dinov2_backbone_and_depth_anything_reload_with_remote_code_without_evit(tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    refs = {}
    for name, model in (("backbone", dinov2_backbone()), ("depth", depth_anything())):
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
        refs[name] = {"folder": str(folder), "auto": meta["auto_class"], "evit": out, "dense": dense_out}
    assert refs["backbone"]["auto"] == "AutoModel" and refs["depth"]["auto"] == "AutoModelForDepthEstimation"
    torch.save({"x": x, "refs": refs}, tmp_path / "refs.pt")
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
                    o = model(data["x"])
                return o.feature_maps[-1] if hasattr(o, "feature_maps") else o.predicted_depth
            result[name] = {"class": type(remote).__name__, "evit": (take(remote) - r["evit"]).abs().max().item(),
                            "dense": (take(dense) - r["dense"]).abs().max().item()}
        print(json.dumps(result))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["backbone"]["class"] == "EvitDinov2Backbone"
    assert result["depth"]["class"] == "EvitDepthAnythingForDepthEstimation"
    for name, r in result.items():
        assert r["evit"] < 1e-5 and r["dense"] < 1e-5, (name, r)


def test_dinov2_backbone_and_depth_anything_export_to_onnx(tmp_path):
    from evit_cli.io.export import export

    for name, model in (("backbone", dinov2_backbone()), ("depth", depth_anything())):
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        report = export(model, "onnx", tmp_path / f"{name}.onnx")  # checked against PyTorch on batches 1 and 8
        assert (tmp_path / f"{name}.onnx").is_file() and report["tokens_after_layers"] == [34, 19]
