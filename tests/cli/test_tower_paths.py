"""Towers without a class token through every command a converted model goes to: bench, eval, sweep,
search, visualize, finetune and export (ONNX), for a timm global-average tower, a timm attention-pool
(MAP) tower and a transformers SigLIP classifier, each converted with a score other than its default
(``mean_query``), which every command must keep; and a SigLIP 2 classifier (padded patches under a mask)."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import timm
import torch
from conftest import randomize
from PIL import Image
from test_cli import run
from test_train import write_colour_folder

import evit_cli
from evit_cli.model.convert import get_config
from evit_cli.model.macs import count_macs

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=3)
LAYERS = (2, 3)
SCORE = "mean_query"  # not the default of any of them: a command that dropped it would fall back to `received`


def _tower(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "timm_avg":
        return randomize(evit_cli.load_model("vit_base_patch16_224", pretrained=False, global_pool="avg",
                                             class_token=False, **TINY))
    if kind == "timm_map":
        return randomize(evit_cli.load_model("vit_base_patch16_siglip_224", pretrained=False, **TINY))
    import transformers as tf

    vision = dict(patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                max_position_embeddings=16)
    if kind == "siglip2":  # flattened patches padded to num_patches under a mask (evit feeds 8 x 8 = 64 of them)
        return randomize(tf.Siglip2ForImageClassification(tf.Siglip2Config(
            text_config=text, vision_config={**vision, "num_patches": 64}, num_labels=3)))
    return randomize(tf.SiglipForImageClassification(tf.SiglipConfig(
        text_config=text, vision_config={**vision, "image_size": 32}, num_labels=3)))


@pytest.fixture(scope="module", params=["timm_avg", "timm_map", "siglip", "siglip2"])
def tower(request, tmp_path_factory):
    model = evit_cli.convert(_tower(request.param).eval(), keep_rate=0.7, layers=LAYERS, score=SCORE)
    return evit_cli.save(model, tmp_path_factory.mktemp(request.param) / "m")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("data") / "colours", 4)


def _reconverted(folder, keep_rate) -> torch.nn.Module:
    return evit_cli.convert(evit_cli.load(folder), keep_rate=keep_rate, layers=LAYERS, score=SCORE)


def test_bench_counts_the_towers_tokens(tower, capsys):
    code, stdout, err = run(["bench", tower, "--batch", 2, "--reps", 1, "--warmup", 0, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["evit_model"]["tokens"][1:] == evit_cli.tokens_after_layers(evit_cli.load(tower))
    assert r["evit_model"]["gmacs"] * 1e9 == pytest.approx(count_macs(evit_cli.load(tower), 32), rel=1e-6)


def test_sweep_and_search_keep_the_score(tower, tmp_path, capsys):
    code, stdout, err = run(["sweep", tower, "--keep-rates", "0.5,0.7", "--batch", 2, "--reps", 1,
                             "-o", tmp_path / "sw", "--json"], capsys)
    assert code == 0, err
    rows = {x["keep_rate"]: x for x in json.loads(stdout)["rows"] if x["model"] == "evit"}
    assert rows[0.5]["gmacs"] * 1e9 == pytest.approx(count_macs(_reconverted(tower, 0.5), 32), rel=1e-6)
    target = count_macs(_reconverted(tower, 0.6), 32) / 1e9
    code, stdout, err = run(["search", tower, "--target-gmacs", target, "--json"], capsys)
    assert code == 0, err
    printed = shlex.split(json.loads(stdout)["command"])
    assert printed[0] == "evit"
    code, _, err = run([*printed[1:], "-o", tmp_path / "found"], capsys)  # the command search printed, run
    assert code == 0, err
    assert get_config(evit_cli.load(tmp_path / "found")).score == SCORE


@pytest.mark.parametrize("tower", ["timm_map", "siglip", "siglip2"], indirect=True)  # the average pool: the same path
def test_eval_finetune_and_export_keep_the_score(tower, colours, tmp_path, capsys):
    code, stdout, err = run(["eval", tower, "--dataset", colours, "--batch", 4, "--reps", 1, "--workers", 0,
                             "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["evit_model"]["gmacs"] * 1e9 == pytest.approx(count_macs(evit_cli.load(tower), 32),
                                                                            rel=1e-6)
    code, _, err = run(["finetune", tower, "--dataset", colours, "--epochs", 0.1, "--batch-size", 4, "--workers", 0,
                        "--no-bench", "-o", tmp_path / "ft"], capsys)
    assert code == 0, err
    assert get_config(evit_cli.load(tmp_path / "ft")).score == SCORE
    code, stdout, err = run(["export", tmp_path / "ft", "--check-batches", "1,2", "--json"], capsys)
    assert code == 0, err


def test_visualize_draws_the_tower(tower, tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 200, (48, 64, 3), dtype=np.uint8)).save(photo)
    code, stdout, err = run(["visualize", tower, photo, "-o", tmp_path / "v.png", "--json"], capsys)
    assert code == 0, err
    assert (tmp_path / "v.png").stat().st_size > 0
    assert len(json.loads(stdout)["blanked_patches"][0]) == len(LAYERS)


def test_a_hand_built_timm_model_that_would_not_rebuild_is_refused_at_save(tmp_path):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, global_pool="avg", class_token=False, **TINY)
    with pytest.raises(evit_cli.EvitError, match="load_model"):
        evit_cli.save(evit_cli.convert(model, keep_rate=0.7, layers=LAYERS), tmp_path / "m")
    assert not (tmp_path / "m").exists()
