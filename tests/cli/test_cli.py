"""The `evit` command end to end: exit codes, one-line errors, files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_timm

import evit_cli
from evit_cli.cli import main

REAL = Path(__file__).resolve().parents[3] / "shared" / "real"


def run(argv, capsys):
    """Run `evit ARGV` in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["evit", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def tiny_folder(tmp_path):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 4))
    return evit_cli.save(model, tmp_path / "tiny_evit")


def test_convert_writes_folder_and_json_summary(tmp_path, capsys):
    out = tmp_path / "deit_t"
    code, stdout, _ = run(["convert", "deit_tiny_patch16_224", "--no-pretrained", "-k", "0.7", "-l", "4,7,10",
                           "-o", out, "--json"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["tokens"] == [197, 140, 100, 72]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "evit.json", "model.safetensors"]
    assert evit_cli.tokens_after_layers(evit_cli.load(out)) == [140, 100, 72]


def test_reconvert_an_exported_folder_with_new_keep_rates(tiny_folder, tmp_path, capsys):
    code, _, _ = run(["convert", tiny_folder, "-k", "0.9,0.5", "-l", "3,5", "--no-fuse", "-o", tmp_path / "again"],
                     capsys)
    assert code == 0
    model = evit_cli.load(tmp_path / "again")
    assert evit_cli.model_state(model).config == evit_cli.EViTConfig((3, 5), (0.9, 0.5), False)


def test_bench_folder_writes_report_inside_it(tiny_folder, capsys):
    code, stdout, _ = run(["bench", tiny_folder, "--batch", 4, "--reps", 2, "--warmup", 1, "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["batch"] == 4
    assert report["evit_model"]["tokens"] == [65, 47, 35]
    assert report["dense"]["gmacs"] > report["evit_model"]["gmacs"] > 0
    assert report["evit_model"]["latency"]["reps"] == 2
    assert report["evit_model"]["latency_b1"]["reps"] >= 6
    assert json.loads((tiny_folder / "bench.json").read_text())["batch"] == 4
    assert "| EViT |" in (tiny_folder / "bench.md").read_text()


def test_bench_table_on_terminal(tiny_folder, capsys, tmp_path):
    code, stdout, _ = run(["bench", tiny_folder, "--batch", 2, "--reps", 1, "--warmup", 0, "--report", tmp_path / "r"],
                          capsys)
    assert code == 0
    assert "speedup" in stdout and "EViT" in stdout
    assert (tmp_path / "r" / "bench.md").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "deit_smal_patch16_224", "--no-pretrained"], "Did you mean"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-l", "0"], "out of range"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-l", "13"], "out of range"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-l", "4,4"], "repeats"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-l", "4,x"], "comma-separated"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-k", "0"], "outside"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-k", "1.5"], "outside"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-k", "0.0000000001"], "keeps no token"),
        (["convert", "deit_tiny_patch16_224", "--no-pretrained", "-k", "0.9,0.8"], "2 keep rates for 3 layers"),
        (["convert", "deit_tiny_patch16_224", "--checkpoint", "/nonexistent.pth"], "does not exist"),
        (["convert", "resnet18", "--no-pretrained"], "not a supported Vision Transformer"),
        (["convert", "vit_base_patch16_reg4_gap_256", "--no-pretrained", "--score", "cls"], "no class token"),
        (["bench", "deit_tiny_patch16_224", "--batch", "0"], "at least 1"),
        (["bench", "deit_tiny_patch16_224", "--device", "cuda"], "no CUDA"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(args, capsys)
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tiny_folder, capsys):
    code, _, stderr = run(["convert", tiny_folder, "-o", tiny_folder], capsys)
    assert code == 2 and "--overwrite" in stderr


def test_version_and_help(capsys):
    code, stdout, _ = run(["--version"], capsys)
    assert code == 0 and evit_cli.__version__ in stdout
    for cmd in ("convert", "bench"):
        code, stdout, _ = run([cmd, "--help"], capsys)
        assert code == 0 and "Example" in stdout


@pytest.mark.skipif(not (REAL / "deit_tiny_patch16_224.safetensors").is_file(), reason="needs ../shared/real")
def test_real_deit_tiny_checkpoint_off_the_shelf(tmp_path, capsys):
    """Real weights + real photos: EViT at 0.7 without training keeps most dense predictions."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    out = tmp_path / "real"
    code, _, _ = run(["convert", "deit_tiny_patch16_224", "--checkpoint", REAL / "deit_tiny_patch16_224.safetensors",
                      "-o", out], capsys)
    assert code == 0
    evit = evit_cli.load(out)
    dense = evit_cli.dense_copy(evit)
    tf = create_transform(**resolve_data_config(model=dense))
    files = sorted(REAL.glob("imagenette-val/*/*.JPEG"))[::200][:20]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        agree = (dense(x).argmax(1) == evit(x).argmax(1)).float().mean().item()
    assert agree >= 0.8
