"""ONNX Runtime figures beside the PyTorch ones: both models exported, timed interleaved, a speedup."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_timm

import evit_cli
from evit_cli.measure.bench import bench
from evit_cli.measure.report import bench_notes, bench_rows


def test_bench_times_dense_and_evit_in_onnxruntime(tmp_path):
    model = tiny_timm("vit")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    r = bench(model, batch=4, warmup=1, reps=3, latency_reps=3, onnx=True)
    o = r["onnxruntime"]
    assert o["provider"] == "CPUExecutionProvider" and o["threads"] >= 1
    for key in ("dense", "evit_model"):
        assert o[key]["latency"]["reps"] == 3 and o[key]["latency_b1"]["reps"] == 3
        assert o[key]["images_per_s"] == pytest.approx(4 / (o[key]["latency"]["median_ms"] / 1000))
    assert o["speedup"] == pytest.approx(o["dense"]["latency"]["median_ms"] / o["evit_model"]["latency"]["median_ms"])
    assert o["speedup_b1"] == pytest.approx(o["dense"]["latency_b1"]["median_ms"]
                                            / o["evit_model"]["latency_b1"]["median_ms"])
    labels = [row[0] for row in bench_rows(r)]
    assert labels[1:] == ["dense", "dense ONNX Runtime", "EViT", "EViT ONNX Runtime"]
    assert any(n.startswith("ONNX Runtime ") and "at batch 1" in n for n in bench_notes(r))
    assert next(model.parameters()).device.type == "cpu" and evit_cli.tokens_after_layers(model) == [34, 19]


def test_bench_onnx_option_on_the_command_line(tmp_path, capsys):
    from evit_cli.cli import main

    model = tiny_timm("vit")
    evit_cli.convert(model, keep_rate=0.5, layers=(2,))
    evit_cli.save(model, tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path / "m"), "--batch", "2", "--reps", "2", "--warmup", "0", "--onnx", "--json"])
    assert e.value.code in (0, None)
    result = json.loads(capsys.readouterr().out)
    assert result["onnxruntime"]["speedup"] > 0 and "dense" in result["onnxruntime"]
    assert json.loads((tmp_path / "m" / "bench.json").read_text())["onnxruntime"]["threads"] >= 1
