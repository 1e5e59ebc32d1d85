"""The squeeze method through every command a converted model goes to: bench, eval, sweep, visualize,
finetune, for a timm and a transformers model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_timm
from PIL import Image
from test_cli import run
from test_train import write_colour_folder

import evit_cli
from evit_cli.model.convert import get_config
from evit_cli.model.macs import count_macs


def _tiny_hf():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=6,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()


@pytest.fixture(params=["timm", "transformers"])
def squeezed(request, tmp_path):
    model = tiny_timm("vit", num_classes=3) if request.param == "timm" else _tiny_hf()
    evit_cli.convert(model, keep_rate=0.7, layers=(2, 4), method="squeeze")
    return evit_cli.save(model, tmp_path / "m")


def _photo(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 200, (48, 64, 3), dtype=np.uint8)).save(photo)
    return photo


def test_bench_counts_the_squeezed_tokens(squeezed, capsys):
    code, stdout, err = run(["bench", squeezed, "--batch", 2, "--reps", 1, "--warmup", 0, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["evit_model"]["tokens"] == [65, 46, 33]  # prefix + kept, no fused token
    assert r["evit_model"]["gmacs"] * 1e9 == pytest.approx(count_macs(evit_cli.load(squeezed), 32), rel=1e-6)


def test_visualize_blanks_every_squeezed_patch(squeezed, tmp_path, capsys):
    code, stdout, err = run(["visualize", squeezed, _photo(tmp_path), "-o", tmp_path / "v.png", "--json"], capsys)
    assert code == 0, err
    counts = json.loads(stdout)["blanked_patches"][0]
    assert counts == [64 - 45, 64 - math.ceil(0.7 * 45)]  # no fused token to hold a patch


def test_sweep_keeps_the_method(squeezed, tmp_path, capsys):
    code, stdout, err = run(["sweep", squeezed, "--keep-rates", "0.5,0.7", "--batch", 2, "--reps", 1,
                             "-o", tmp_path / "sw", "--json"], capsys)
    assert code == 0, err
    rows = {x["keep_rate"]: x for x in json.loads(stdout)["rows"] if x["model"] == "evit"}
    again = evit_cli.load(squeezed)
    evit_cli.convert(again, keep_rate=0.5, layers=(2, 4), method="squeeze")
    assert rows[0.5]["gmacs"] * 1e9 == pytest.approx(count_macs(again, 32), rel=1e-6)


def test_eval_and_finetune_start_from_the_squeeze(tmp_path, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2, 4)),
                           tmp_path / "paper")
    data = write_colour_folder(tmp_path / "colours", 4)
    code, stdout, err = run(["eval", folder, "--dataset", data, "--batch", 4, "--reps", 1, "--workers", 0, "--json",
                             "--method", "squeeze"], capsys)
    assert code == 0, err
    squeezed = evit_cli.convert(evit_cli.load(folder), keep_rate=0.7, layers=(2, 4), method="squeeze")
    assert json.loads(stdout)["evit_model"]["gmacs"] * 1e9 == pytest.approx(count_macs(squeezed, 32), rel=1e-6)
    code, _, err = run(["finetune", folder, "--dataset", data, "--method", "squeeze", "--epochs", 0.1, "--batch-size",
                        4, "--workers", 0, "--no-bench", "-o", tmp_path / "ft"], capsys)
    assert code == 0, err
    assert get_config(evit_cli.load(tmp_path / "ft")).method == "squeeze"
