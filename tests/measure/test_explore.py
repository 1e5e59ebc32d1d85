"""Higher resolution at matched MACs, eval, sweep, search and visualize."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
from conftest import tiny_timm
from PIL import Image
from test_cli import run
from test_train import write_colour_folder

import evit_cli
from evit_cli.measure.search import candidate_layer_sets
from evit_cli.measure.visualize import BLANK
from evit_cli.model.classes import eval_class_map


@pytest.fixture
def tiny_folder(tmp_path):
    return evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2, 4)),
                         tmp_path / "tiny")


def test_higher_resolution_at_the_dense_models_macs(tmp_path, capsys):
    code, stdout, err = run(["convert", "deit_small_patch16_224", "--no-pretrained", "--img-size", 288,
                             "--match-macs", 224, "-o", tmp_path / "hr", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    dense224 = 4.599  # counted dense DeiT-S at 224 (docs/algorithm.md: 4.6)
    assert s["img_size"] == 288 and s["tokens"][0] == 1 + 18 * 18
    assert s["gmacs_evit"] <= dense224 and s["gmacs_evit"] >= 0.95 * dense224
    # and it runs, rebuilt from the folder at 288 px
    model = evit_cli.load(tmp_path / "hr")
    assert model.patch_embed.img_size == (288, 288)
    rate = s["keep_rates"][0]
    assert evit_cli.tokens_after_layers(model)[0] == 1 + math.ceil(round(rate * 324, 6)) + 1


def test_sweep_writes_table_json_and_png(tiny_folder, tmp_path, capsys):
    data = write_colour_folder(tmp_path / "colours", 6)
    code, stdout, err = run(["sweep", tiny_folder, "--keep-rates", "0.4,0.7,1.0", "--batch", 4, "--reps", 1,
                             "--dataset", data, "--workers", 0, "-o", tmp_path / "sw", "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    evit_rows = sorted((x for x in r["rows"] if x["model"] == "evit"), key=lambda x: x["keep_rate"])
    gmacs = [x["gmacs"] for x in evit_rows]
    assert gmacs == sorted(gmacs) and gmacs[0] < gmacs[-1]  # fewer tokens, fewer MACs
    assert all("top1" in x for x in r["rows"]) and r["images"] == 18
    with Image.open(tmp_path / "sw" / "sweep.png") as img:
        img.verify()
        assert img.format == "PNG"
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"] == r["rows"]


def test_search_target_gmacs_and_the_printed_command_reproduces_it(tiny_folder, tmp_path, capsys):
    code, stdout, err = run(["search", tiny_folder, "--target-gmacs", 0.01, "--search-layers", "--batch", 2,
                             "--reps", 1, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["gmacs"] <= 0.01
    argv = shlex.split(r["command"])
    assert argv[:2] == ["evit", "convert"]
    code, stdout, err = run([*argv[1:], "-o", tmp_path / "again", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["gmacs_evit"] == pytest.approx(r["gmacs"])


def test_candidate_layer_sets_include_the_papers():
    assert (4, 7, 10) in candidate_layer_sets(12)
    assert all(1 < s[0] and s[-1] <= 6 for s in candidate_layer_sets(6))


def test_visualize_blanks_as_many_patches_as_were_fused(tiny_folder, tmp_path, capsys):
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 200, (300, 400, 3), dtype=np.uint8)).save(photo)  # any size
    code, stdout, err = run(["visualize", tiny_folder, photo, photo, "-o", tmp_path / "v.png", "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    img = np.asarray(Image.open(tmp_path / "v.png").convert("RGB"))
    size, grid = r["panel_px"], r["patch_grid"]
    cell = size // grid
    for row, counts in enumerate(r["blanked_patches"]):
        y = row * (size + 4)
        for col, expected in enumerate(counts, start=1):
            x = col * (size + 4)
            panel = img[y:y + size, x:x + size]
            cells = panel.reshape(grid, cell, grid, cell, 3).transpose(0, 2, 1, 3, 4)
            blank = (cells == np.array(BLANK, dtype=np.uint8)).all(axis=(2, 3, 4)).sum()
            assert blank == expected
        # layer 2 (first EViT layer) fuses 64 - ceil(0.7 * 64) = 19 patches;
        # layer 4 leaves 33 tokens of 46 candidates, one of which may be the earlier fused token
        assert counts[0] == 64 - 45
        assert counts[1] in (64 - 33, 64 - 33 + 1)


def test_visualize_unreadable_image_is_a_clear_error(tiny_folder, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    code, _, err = run(["visualize", tiny_folder, tmp_path / "bad.jpg", "-o", tmp_path / "v.png"], capsys)
    assert code == 2 and "cannot read image" in err and not (tmp_path / "v.png").exists()


def test_eval_reports_dense_and_evit_on_the_same_images(tiny_folder, tmp_path, capsys):
    data = write_colour_folder(tmp_path / "colours", 4)
    code, stdout, err = run(["eval", tiny_folder, "--dataset", data, "--batch", 4, "--reps", 1, "--workers", 0,
                             "--json", "--report", tmp_path / "r"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["images"] == 12 and r["dense"]["images"] == r["evit_model"]["images"] == 12
    assert r["dense"]["gmacs"] > r["evit_model"]["gmacs"]
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["images"] == 12


def test_imagenet_synsets_map_to_a_1000_class_model():
    m1000, m2 = tiny_timm("vit", num_classes=1000), tiny_timm("vit", num_classes=2)
    assert eval_class_map(["n01440764", "n02102040", "n03888257"], m1000) == [0, 217, 701]
    assert eval_class_map(["a", "b"], m2) is None
    with pytest.raises(evit_cli.EvitError, match="3 classes and the model 1000"):
        eval_class_map(["a", "b", "c"], m1000)
