"""`evit eval` compares a fine-tuned folder with the dense model it started from, or with --reference."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_timm
from test_cli import run
from test_recovery import _flat_folder

import evit_cli
from evit_cli.measure.reference import origin_of
from evit_cli.train import TrainConfig, finetune


def test_origin_follows_the_chain_of_training_records():
    first = {"from": {"model": "/m/dense", "checkpoint": "w.safetensors", "pretrained": True}, "previous": None}
    second = {"from": {"model": "/m/rec1", "checkpoint": None, "pretrained": None}, "previous": first}
    assert origin_of(second) == first["from"]
    assert origin_of(first) == first["from"]
    assert origin_of(None) is None


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    """A tiny EViT folder, and the same fine-tuned hard (lr 1e-2) on a flat folder: its weights drifted."""
    tmp = tmp_path_factory.mktemp("ref")
    start = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2, 4)),
                          tmp / "start")
    photos = _flat_folder(tmp / "photos", 24)
    out = tmp / "rec"
    finetune(TrainConfig(model=str(start), dataset=str(photos), output=str(out), epochs=1, batch_size=8, lr=1e-2,
                         workers=0, bench=False))
    return start, out, photos


def _eval(capsys, *argv):
    code, stdout, err = run(["eval", *argv, "--reps", "1", "--workers", "0", "--json"], capsys)
    assert code == 0, err
    return json.loads(stdout)


def test_eval_of_a_fine_tuned_folder_compares_with_its_starting_model_and_says_so(drifted, capsys):
    start, rec, photos = drifted
    default = _eval(capsys, rec, "--dataset", photos)
    assert json.loads((rec / "evit.json").read_text())["training"]["from"]["model"] == str(start.resolve())
    assert str(start.resolve()) in default["reference"] and "fine-tuned from" in default["reference"]
    given = _eval(capsys, rec, "--dataset", photos, "--reference", start)
    own = _eval(capsys, rec, "--dataset", photos, "--reference", rec)  # its own drifted weights, EViT off
    assert "--reference" in given["reference"]
    assert default["evit_model"]["kl"] == pytest.approx(given["evit_model"]["kl"], rel=1e-6)
    assert default["evit_model"]["kl"] != pytest.approx(own["evit_model"]["kl"], rel=1e-3)
    code, stdout, _ = run(["eval", rec, "--dataset", photos, "--reps", "1", "--workers", "0"], capsys)
    assert "the dense model it was fine-tuned from" in stdout.replace("\n", " ").replace("│", " ") or \
        "fine-tuned from" in " ".join(stdout.split())


def test_eval_of_a_converted_folder_uses_its_own_weights(drifted, capsys):
    start, _, photos = drifted
    assert "own weights with EViT off" in _eval(capsys, start, "--dataset", photos)["reference"]


def test_reference_with_other_classes_is_one_line(drifted, tmp_path, capsys):
    _, rec, photos = drifted
    other = evit_cli.save(tiny_timm("vit", num_classes=7), tmp_path / "other")
    code, _, err = run(["eval", rec, "--dataset", photos, "--reference", other], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "same classes" in err
