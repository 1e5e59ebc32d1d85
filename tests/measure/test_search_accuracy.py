"""`evit search --max-drop/--min-agreement`: the setting it reports keeps its constraint, checked independently."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from conftest import tiny_timm
from test_cli import run
from test_fidelity import independent_logits, write_flat_folder
from test_train import write_colour_folder

import evit_cli
from evit_cli.model.convert import dense_copy


@pytest.fixture
def confident(tmp_path):
    model = tiny_timm("vit", num_classes=7)
    with torch.no_grad():
        model.head.weight.mul_(5)
    return evit_cli.save(evit_cli.convert(model, keep_rate=0.7, layers=(2, 4)), tmp_path / "m")


def test_min_agreement_on_an_unlabelled_folder(confident, tmp_path, capsys):
    photos = write_flat_folder(tmp_path / "photos", 12)
    code, stdout, err = run(["search", confident, "--dataset", photos, "--min-agreement", 90, "--limit", 100,
                             "--workers", 0, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["calibration_images"] == 12 and r["gmacs"] < r["gmacs_dense"]
    # rebuild the reported setting with the printed command and measure it independently
    argv = shlex.split(r["command"])
    assert argv[:2] == ["evit", "convert"]
    code, _, err = run([*argv[1:], "-o", tmp_path / "found"], capsys)
    assert code == 0, err
    found = evit_cli.load(tmp_path / "found")
    assert list(evit_cli.model.convert.get_config(found).keep_rates) == r["keep_rates"]
    # both methods were searched; the cheaper within the constraint is reported and rebuilt
    assert set(r["methods"]) == {"evit", "squeeze"}
    assert r["method"] == min(r["methods"], key=lambda k: r["methods"][k]["gmacs"])
    assert evit_cli.model.convert.get_config(found).method == r["method"]
    assert ("--method squeeze" in r["command"]) == (r["method"] == "squeeze")
    dense, evit = independent_logits(dense_copy(found), photos), independent_logits(found, photos)
    agreement = 100 * (dense.argmax(-1) == evit.argmax(-1)).float().mean().item()
    assert agreement >= 90 and agreement == pytest.approx(r["agreement"])
    # rates from the search grid; the best single rate within the same constraint keeps it too
    assert all(k in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3) for k in r["keep_rates"])
    single = r["single_rate"]["within_constraint"]
    assert single is None or single["agreement"] >= 90


def test_max_drop_with_labels(tmp_path, capsys):
    data = write_colour_folder(tmp_path / "colours", 4)
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2, 4)),
                           tmp_path / "m")
    code, stdout, err = run(["search", folder, "--dataset", data, "--max-drop", 0, "--limit", 100, "--workers", 0,
                             "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    code, _, err = run([*shlex.split(r["command"])[1:], "-o", tmp_path / "found"], capsys)
    assert code == 0, err
    found = evit_cli.load(tmp_path / "found")
    target = torch.tensor([c for c in range(3) for _ in range(4)])  # blue, green, red: sorted folder order
    top1 = lambda m: 100 * (independent_logits(m, data).argmax(-1) == target).float().mean().item()  # noqa: E731
    assert top1(dense_copy(found)) - top1(found) <= 0 + 1e-9
    assert top1(found) == pytest.approx(r["top1"]) and top1(dense_copy(found)) == pytest.approx(r["top1_dense"])


def test_max_drop_needs_labels(confident, tmp_path, capsys):
    photos = write_flat_folder(tmp_path / "photos", 4)
    code, _, err = run(["search", confident, "--dataset", photos, "--max-drop", 1, "--workers", 0], capsys)
    assert code == 2 and "--max-drop needs labels" in err


def test_method_limits_the_search_to_one_method(confident, tmp_path, capsys):
    photos = write_flat_folder(tmp_path / "photos", 8)
    code, stdout, err = run(["search", confident, "--dataset", photos, "--min-agreement", 50, "--limit", 100,
                             "--workers", 0, "--method", "squeeze", "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert set(r["methods"]) == {"squeeze"} and r["method"] == "squeeze" and "--method squeeze" in r["command"]
    code, _, err = run(["search", confident, "--dataset", photos, "--min-agreement", 50, "--method", "tome"], capsys)
    assert code == 2 and "tome" in err
