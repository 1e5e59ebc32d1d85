"""`evit convert --score`: what ranks the tokens, chosen on the command line and kept in the folder."""

from __future__ import annotations

import json

import pytest
from conftest import randomize
from test_cli import run

import evit_cli

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)


@pytest.fixture
def avg_folder(tmp_path):
    model = evit_cli.convert("vit_base_patch16_224", pretrained=False, global_pool="avg", class_token=False, **TINY,
                             keep_rate=0.7, layers=(2, 3))
    return evit_cli.save(randomize(model), tmp_path / "avg_evit")


def test_score_is_chosen_and_kept(avg_folder, tmp_path, capsys):
    assert evit_cli.model_state(evit_cli.load(avg_folder)).config.score == "received"
    code, _, err = run(["convert", avg_folder, "--score", "mean_query", "-o", tmp_path / "again"], capsys)
    assert code == 0, err
    assert evit_cli.model_state(evit_cli.load(tmp_path / "again")).config.score == "mean_query"


@pytest.mark.parametrize("score, message", [("cls", "has no class token"), ("best", "--score must be one of")])
def test_a_score_the_model_cannot_take_is_one_line_exit_2(avg_folder, tmp_path, capsys, score, message):
    code, _, err = run(["convert", avg_folder, "--score", score, "-o", tmp_path / "no"], capsys)
    assert code == 2
    assert message in err and err.strip().count("\n") == 0


def test_card_and_info_name_the_score_and_the_restore(avg_folder, tmp_path, capsys):
    code, out, err = run(["convert", avg_folder, "--score", "mean_query", "--restore", "reconstruct:0.1",
                          "-o", tmp_path / "again", "--json"], capsys)
    assert code == 0, err
    assert (json.loads(out)["score"], json.loads(out)["restore"]) == ("mean_query", "reconstruct:0.1")
    card = (tmp_path / "again" / "README.md").read_text()
    assert "- tokens ranked by: attention of the mean query" in card
    assert "restored for dense maps by: reconstruct (temperature 0.1)" in card
    code, out, _ = run(["info", tmp_path / "again", "--json"], capsys)
    info = json.loads(out)
    assert (info["score"], info["method"], info["restore"]) == ("mean_query", "evit", "reconstruct:0.1")


@pytest.mark.parametrize("command", [
    ["bench", "--batch", "2", "--reps", "1"], ["eval", "-d", "imgs"], ["sweep", "-o", "sweep_out"],
    ["search", "--target-gmacs", "0.001"], ["visualize", "img.png", "-o", "v.png"]])
def test_every_command_that_converts_takes_the_score(avg_folder, capsys, command, tmp_path, monkeypatch):
    """Asked on any command, the score reaches the conversion: a score the tower cannot take is refused."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run([command[0], avg_folder, *command[1:], "--score", "cls"], capsys)
    assert code == 2 and "has no class token" in err, err


def test_search_reproduces_the_score_and_restore_it_was_given(avg_folder, capsys):
    code, out, err = run(["search", avg_folder, "--target-gmacs", "0.008", "--score", "mean_query",
                          "--restore", "reconstruct:0.1", "--json"], capsys)
    assert code == 0, err
    command = json.loads(out)["command"]
    assert command.endswith("--score mean_query --restore reconstruct:0.1"), command


def test_bench_and_eval_captions_say_the_score_and_restore(avg_folder, capsys, tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (120, 30 * i, 200)).save(tmp_path / "imgs" / f"{i}.png")
    for command in (["bench", "--batch", "2", "--reps", "1", "--report", tmp_path / "r"],
                    ["eval", "-d", tmp_path / "imgs", "--reps", "1"]):
        code, out, err = run([command[0], avg_folder, *command[1:], "--score", "mean_query",
                              "--restore", "reconstruct:0.1"], capsys)
        assert code == 0, err
        assert "ranked by mean_query, restore reconstruct:0.1" in " ".join(out.split()), out
