"""The exported folder rebuilds the same model from the folder alone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_timm
from safetensors.torch import load_file

import evit_cli


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers"])
def test_saved_folder_reloads_to_identical_outputs(kind, tmp_path, images):
    model = evit_cli.convert(tiny_timm(kind), keep_rate="0.8,0.6", layers="2,5", fuse=kind != "registers")
    with torch.no_grad():
        before = model(images)
    evit_cli.save(model, tmp_path / "out")
    loaded = evit_cli.load(tmp_path / "out")
    with torch.no_grad():
        after = loaded(images)
    assert torch.equal(before, after)
    assert evit_cli.model_state(loaded).config == evit_cli.model_state(model).config


def test_folder_holds_timm_weights_and_metadata(tmp_path):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 4))
    evit_cli.save(model, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "evit.json").read_text())
    assert meta["source"]["model"] == "vit_tiny_patch16_224"
    assert meta["source"]["kwargs"]["embed_dim"] == 48
    assert meta["evit"] == {"layers": [2, 4], "keep_rates": [0.7, 0.7], "fuse": True}
    assert meta["num_classes"] == 10 and meta["img_size"] == 32
    assert meta["token_counts"] == [1 + 45 + 1, 1 + 33 + 1]  # ceil(.7*64)=45, ceil(.7*46)=33
    assert meta["tool_version"] == evit_cli.__version__
    # the weights are timm's own keys: a plain timm model loads them strictly
    plain = tiny_timm("vit", seed=5)
    plain.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"), strict=True)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2,))
    evit_cli.save(model, tmp_path / "out")
    with pytest.raises(evit_cli.EvitError, match="already exists"):
        evit_cli.save(model, tmp_path / "out")
    evit_cli.save(model, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2,))
    with pytest.raises(evit_cli.EvitError, match="No space left"):
        evit_cli.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_plain_timm_model_can_be_exported(tmp_path, images):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32)
    evit_cli.convert(model, keep_rate=0.5, layers=(3,))
    evit_cli.save(model, tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(evit_cli.load(tmp_path / "plain")(images), model(images))
