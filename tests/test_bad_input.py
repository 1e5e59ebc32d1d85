"""Bad input, case by case, across all commands: exit 2, one line on stderr, no traceback,
and nothing left where the output was to go."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import evit_cli
from conftest import tiny_timm
from test_cli import run
from test_train import write_colour_folder


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with good and bad inputs."""
    import datasets

    root = tmp_path_factory.mktemp("ws")
    evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2, 4)), root / "m")
    write_colour_folder(root / "colours", 3)
    ds = datasets.load_dataset("imagefolder", data_dir=str(root / "colours"))["train"]
    ds.remove_columns("label").save_to_disk(str(root / "nolabel"))
    ds.remove_columns("image").save_to_disk(str(root / "noimage"))
    with open(root / "evil.pth", "wb") as f:
        pickle.dump({"model": _RunsCode()}, f)
    sd = {k: v.contiguous() for k, v in tiny_timm("vit").state_dict().items()}
    save_file(sd, root / "tiny.safetensors")
    data = (root / "tiny.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 3])
    torch.save({"head.weight": torch.zeros(3, 3)}, root / "wrong.pth")
    (root / "bad.jpg").write_bytes(b"\x00not an image")
    (root / "bad.yaml").write_text("learning_rate: 1\n")
    (root / "notyaml.yaml").write_text("a: [1, 2\n")
    (root / "existing").mkdir()
    return root


M = "m"  # the tiny exported model, relative to the workspace
CASES = [
    # models and checkpoints
    ("unknown name", ["convert", "deit_smal_patch16_224", "--no-pretrained", "-o", "o"], "Did you mean"),
    ("not a ViT", ["convert", "resnet18", "--no-pretrained", "-o", "o"], "not a supported Vision Transformer"),
    ("ViT without class token", ["convert", "vit_base_patch16_reg4_gap_256", "--no-pretrained", "-o", "o"], "no class token"),
    ("missing local folder", ["convert", "./nope", "-o", "o"], "does not exist"),
    ("missing checkpoint", ["convert", "deit_tiny_patch16_224", "-c", "missing.pth", "-o", "o"], "does not exist"),
    ("truncated checkpoint", ["convert", "vit_tiny_patch16_224", "-c", "cut.safetensors", "-o", "o"], "truncated"),
    ("malicious pickle", ["convert", "deit_tiny_patch16_224", "-c", "evil.pth", "-o", "o"], "refused"),
    ("wrong architecture", ["convert", "deit_tiny_patch16_224", "-c", "tiny.safetensors", "-o", "o"], "does not fit"),
    ("wrong head in checkpoint", ["convert", "deit_tiny_patch16_224", "-c", "wrong.pth", "-o", "o"], "does not fit"),
    # layers and keep rates
    ("layer 0", ["convert", M, "-l", "0", "-o", "o"], "out of range"),
    ("layer past the depth", ["convert", M, "-l", "7", "-o", "o"], "out of range"),
    ("repeated layers", ["convert", M, "-l", "2,2", "-o", "o"], "repeats"),
    ("layers not numbers", ["convert", M, "-l", "two", "-o", "o"], "comma-separated"),
    ("keep rate 0", ["convert", M, "-k", "0", "-o", "o"], "outside (0, 1]"),
    ("keep rate negative", ["convert", M, "-k", "-0.5", "-o", "o"], "outside (0, 1]"),
    ("keep rate above 1", ["convert", M, "-k", "1.2", "-o", "o"], "outside (0, 1]"),
    ("keep rate keeps nothing", ["convert", M, "-k", "1e-9", "-o", "o"], "keeps no token"),
    ("keep rate not a number", ["convert", M, "-k", "high", "-o", "o"], "must be a number"),
    ("rates and layers mismatch", ["convert", M, "-k", "0.9,0.8,0.7", "-l", "2,4", "-o", "o"], "3 keep rates for 2 layers"),
    ("match-macs with keep-rate", ["convert", M, "--match-macs", "32", "-k", "0.5", "-o", "o"], "drop --keep-rate"),
    ("image size 0", ["convert", M, "--img-size", "0", "-o", "o"], "--img-size must be positive"),
    ("output exists", ["convert", M, "-o", "existing"], "--overwrite"),
    # bench, eval, sweep, search
    ("batch size 0", ["bench", M, "--batch", "0"], "at least 1"),
    ("cuda without CUDA", ["bench", M, "--device", "cuda"], "no CUDA"),
    ("eval batch 0", ["eval", M, "--dataset", "colours", "--batch", "0"], "at least 1"),
    ("eval cuda without CUDA", ["eval", M, "--dataset", "colours", "--device", "cuda"], "no CUDA"),
    ("data set without image column", ["eval", M, "--dataset", "noimage", "--workers", "0"], "no image column"),
    ("missing data set folder", ["eval", M, "--dataset", "./nodata"], "does not exist"),
    ("sweep keep rate 0", ["sweep", M, "--keep-rates", "0,0.5", "-o", "sw"], "outside (0, 1]"),
    ("search without target", ["search", M], "give one target"),
    ("search unreachable target", ["search", M, "--target-gmacs", "0.000001"], "no keep rate"),
    # visualize
    ("unreadable image", ["visualize", M, "bad.jpg", "-o", "v.png"], "cannot read image"),
    # finetune
    ("finetune without data set", ["finetune", M, "-o", "ft"], "no data set"),
    ("finetune batch 0", ["finetune", M, "--dataset", "colours", "-b", "0", "-o", "ft", "--workers", "0"], "at least 1"),
    ("unknown recipe key", ["finetune", M, "--recipe", "bad.yaml", "--dataset", "colours", "-o", "ft"], "unknown recipe keys"),
    ("recipe not YAML", ["finetune", M, "--recipe", "notyaml.yaml", "--dataset", "colours", "-o", "ft"], "not valid YAML"),
    ("missing recipe", ["finetune", M, "--recipe", "none.yaml", "--dataset", "colours", "-o", "ft"], "does not exist"),
    ("resume with nothing", ["finetune", M, "--dataset", "colours", "-o", "ft", "--resume"], "nothing to resume"),
    # export and info
    ("unknown export format", ["export", M, "--format", "tflite"], "unknown format"),
    ("export a folder without evit.json", ["export", "colours", "--format", "onnx"], "no evit.json"),
    ("check batches not numbers", ["export", M, "--check-batches", "one"], "comma-separated integers"),
    ("info on a non-export", ["info", "colours"], "no evit.json"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(args, message, ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    code, stdout, stderr = run(args, capsys)
    assert code == 2, stderr
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before  # nothing half-written, nothing run
    assert not (ws / "pwned").exists()


def test_disk_full_while_exporting_leaves_nothing(ws, capsys, monkeypatch, tmp_path):
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, stderr = run(["convert", ws / M, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "No space left on device" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
