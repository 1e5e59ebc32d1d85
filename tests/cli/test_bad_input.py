"""Bad input, case by case, across all commands: exit 2, one line on stderr, no traceback,
and nothing left where the output was to go."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import tiny_timm
from safetensors.torch import save_file
from test_cli import run
from test_train import write_colour_folder

import evit_cli


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
    _more_bad_inputs(root, sd, data)
    return root


def _more_bad_inputs(root, sd, safetensors_bytes):
    """Files for the second table: broken folders, data sets with a bad image, odd checkpoints."""
    import shutil

    from PIL import Image

    (root / "afile").write_text("a regular file\n")
    shutil.copytree(root / "colours", root / "badcol")
    (root / "badcol" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("L", (12000, 12000)).save(root / "bomb.png")  # 144 M pixels: above PIL's limit
    shutil.copytree(root / "colours", root / "bombcol")
    shutil.copy(root / "bomb.png", root / "bombcol" / "red" / "bomb.png")
    for name, meta in (("notjson", "{not json"), ("nokeys", '{"format": "evit"}')):
        shutil.copytree(root / "m", root / name)
        (root / name / "evit.json").write_text(meta)
    for name in ("badbench", "badmetrics"):
        shutil.copytree(root / "m", root / name)
    (root / "badbench" / "bench.json").write_text("[1, 2")
    (root / "badmetrics" / "metrics.json").write_text("\x00\x01")
    save_file({k: (v * 100).to(torch.int32) for k, v in sd.items()}, root / "int.safetensors")
    (root / "st_named.pth").write_bytes(safetensors_bytes)
    recipes = {"r_epochs": "epochs: abc", "r_workers": "workers: -1", "r_keep": "keep_rate: [0.7, x]",
               "r_smooth": "smoothing: 1", "r_lr": "lr: .nan", "r_batch": "batch_size: 2.5", "r_amp": "amp: 'yes'",
               "r_layers": "layers: four", "r_list": "- 1\n- 2"}
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text + "\n")


M = "m"  # the tiny exported model, relative to the workspace
CASES = [
    # models and checkpoints
    ("unknown name", ["convert", "deit_smal_patch16_224", "--no-pretrained", "-o", "o"], "Did you mean"),
    ("not a ViT", ["convert", "resnet18", "--no-pretrained", "-o", "o"], "not a supported Vision Transformer"),
    ("class score without class token", ["convert", "vit_base_patch16_reg4_gap_256", "--no-pretrained", "--score",
                                         "cls", "-o", "o"], "no class token"),
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
    ("rates and layers mismatch", ["convert", M, "-k", "0.9,0.8,0.7", "-l", "2,4", "-o", "o"],
     "3 keep rates for 2 layers"),
    ("match-macs with keep-rate", ["convert", M, "--match-macs", "32", "-k", "0.5", "-o", "o"], "drop --keep-rate"),
    ("image size 0", ["convert", M, "--img-size", "0", "-o", "o"], "--img-size must be at least 1"),
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
    ("new head without labels", ["finetune", M, "--dataset", "nolabel", "--head", "new", "-o", "ft", "--workers", "0"],
     "--head new needs labels"),
    ("finetune batch 0", ["finetune", M, "--dataset", "colours", "-b", "0", "-o", "ft", "--workers", "0"],
     "at least 1"),
    ("unknown recipe key", ["finetune", M, "--recipe", "bad.yaml", "--dataset", "colours", "-o", "ft"],
     "unknown recipe keys"),
    ("recipe not YAML", ["finetune", M, "--recipe", "notyaml.yaml", "--dataset", "colours", "-o", "ft"],
     "not valid YAML"),
    ("missing recipe", ["finetune", M, "--recipe", "none.yaml", "--dataset", "colours", "-o", "ft"], "does not exist"),
    ("resume with nothing", ["finetune", M, "--dataset", "colours", "-o", "ft", "--resume"], "nothing to resume"),
    # export and info
    ("unknown export format", ["export", M, "--format", "tflite"], "unknown format"),
    ("export a folder without evit.json", ["export", "colours", "--format", "onnx"], "no evit.json"),
    ("check batches not numbers", ["export", M, "--check-batches", "one"], "comma-separated integers"),
    ("info on a non-export", ["info", "colours"], "no evit.json"),
]


F = ["finetune", M, "--dataset", "colours", "-o", "ft", "--workers", "0"]  # a finetune that would run
NEW_CASES = [
    # usage: unknown options, bad types, missing values, unknown commands
    ("unknown option", ["convert", M, "--kep-rate", "0.5"], "No such option: --kep-rate"),
    ("not an integer", ["bench", M, "--batch", "x"], "Invalid value for '--batch'"),
    ("not a float", ["finetune", M, "--lr", "fast"], "Invalid value for '--lr'"),
    ("missing argument", ["convert"], "Missing argument"),
    ("missing option value", ["eval", M, "--dataset"], "requires an argument"),
    ("missing required option", ["eval", M], "Missing option '--dataset'"),
    ("unknown command", ["frobnicate"], "No such command"),
    ("option of another command", ["convert", M, "--device", "cpu"], "No such option: --device"),
    # convert: output paths
    ("output not writable", ["convert", M, "-o", "/proc/evit_out"], "cannot write into /proc"),
    ("output below a regular file", ["convert", M, "-o", "afile/out"], "afile is a file"),
    ("output is a file", ["convert", M, "-o", "afile"], "is not a folder"),
    ("output is a file even with overwrite", ["convert", M, "-o", "afile", "--overwrite"], "is not a folder"),
    # convert: sizes and classes
    ("image size 3", ["convert", M, "--img-size", "3", "-o", "o"], "not a multiple of the patch size 4"),
    ("image size 30 with patch 4", ["convert", M, "--img-size", "30", "-o", "o"], "use 28 or 32"),
    ("image size negative", ["convert", M, "--img-size", "-32", "-o", "o"], "at least 1"),
    ("image size not a number", ["convert", M, "--img-size", "big", "-o", "o"], "Invalid value for '--img-size'"),
    ("match-macs 0", ["convert", M, "--match-macs", "0", "-o", "o"], "--match-macs must be at least 1"),
    ("match-macs off the patch grid", ["convert", M, "--match-macs", "30", "-o", "o"], "not a multiple"),
    ("num-classes negative", ["convert", "deit_tiny_patch16_224", "--no-pretrained", "--num-classes", "-3", "-o", "o"],
     "--num-classes must be 0 or more"),
    ("num-classes with exported folder", ["convert", M, "--num-classes", "4", "-o", "o"], "drop --num-classes"),
    ("checkpoint with exported folder", ["convert", M, "-c", "tiny.safetensors", "-o", "o"], "drop --checkpoint"),
    ("checkpoint with exported folder, eval", ["eval", M, "-d", "colours", "-c", "tiny.safetensors"],
     "drop --checkpoint"),
    ("no-pretrained with exported folder", ["convert", M, "--no-pretrained", "-o", "o"], "drop --no-pretrained"),
    ("pretrained with exported folder, sweep", ["sweep", M, "--pretrained", "-o", "sw"], "drop --pretrained"),
    ("no-pretrained with exported folder, finetune",
     ["finetune", M, "--dataset", "colours", "--no-pretrained", "-o", "ft"], "drop --no-pretrained"),
    # convert: keep rates and layers
    ("empty keep-rate entry", ["convert", M, "-k", "0.7,,0.5", "-o", "o"], "has an empty entry"),
    ("leading comma in keep rates", ["convert", M, "-k", ",0.7", "-o", "o"], "has an empty entry"),
    ("trailing comma in keep rates", ["convert", M, "-k", "0.7,", "-o", "o"], "has an empty entry"),
    ("keep rate nan", ["convert", M, "-k", "nan", "-o", "o"], "outside (0, 1]"),
    ("keep rate inf", ["convert", M, "-k", "inf", "-o", "o"], "outside (0, 1]"),
    ("keep rate empty", ["convert", M, "-k", "", "-o", "o"], "--keep-rate is empty"),
    ("layers empty", ["convert", M, "-l", "", "-o", "o"], "--layers is empty"),
    ("empty layer entry", ["convert", M, "-l", "2,,4", "-o", "o"], "has an empty entry"),
    ("layers decreasing", ["convert", M, "-l", "4,2", "-o", "o"], "increasing order"),
    ("layer not an integer", ["convert", M, "-l", "2.5", "-o", "o"], "comma-separated block numbers"),
    # convert: checkpoints and exported folders
    ("integer weights", ["convert", "vit_tiny_patch16_224", "-c", "int.safetensors", "-o", "o"],
     "holds integer tensors where weights should be float"),
    ("safetensors named .pth", ["convert", "deit_tiny_patch16_224", "-c", "st_named.pth", "-o", "o"], "does not fit"),
    ("checkpoint is text", ["convert", "deit_tiny_patch16_224", "-c", "afile", "-o", "o"],
     "not a readable PyTorch checkpoint"),
    ("evit.json not JSON", ["convert", "notjson", "-o", "o"], "is not valid JSON"),
    ("evit.json incomplete", ["convert", "nokeys", "-o", "o"], "is incomplete"),
    ("missing folder with brackets", ["convert", "./data[v2]", "-o", "o"], "data[v2] does not exist"),
    ("a file as the model", ["convert", "afile", "-o", "o"], "pass the file as --checkpoint"),
    # bench
    ("bench batch negative", ["bench", M, "--batch", "-5"], "--batch must be at least 1"),
    ("bench reps 0", ["bench", M, "--reps", "0"], "--reps must be at least 1"),
    ("bench warmup negative", ["bench", M, "--warmup", "-1"], "--warmup must be 0 or more"),
    ("bench device mps", ["bench", M, "--device", "mps"], "unknown device 'mps'"),
    ("bench device cuda:x", ["bench", M, "--device", "cuda:x"], "unknown device"),
    ("bench device empty", ["bench", M, "--device", ""], "--device must be a non-empty text"),
    ("bench report is a file", ["bench", M, "--report", "afile"], "is a file, not a folder"),
    ("bench report below a file", ["bench", M, "--report", "afile/r"], "afile is a file"),
    ("bench empty keep-rate entry", ["bench", M, "-k", "0.7,,0.5"], "has an empty entry"),
    ("bench evit.json not JSON", ["bench", "notjson", "--report", "r"], "is not valid JSON"),
    ("bench missing folder", ["bench", "./gone", "--report", "r"], "does not exist"),
    # eval
    ("eval workers negative", ["eval", M, "-d", "colours", "--workers", "-1"], "--workers must be 0 or more"),
    ("eval limit 0", ["eval", M, "-d", "colours", "--limit", "0"], "--limit must be at least 1"),
    ("eval limit negative", ["eval", M, "-d", "colours", "--limit", "-2"], "--limit must be at least 1"),
    ("eval reps 0", ["eval", M, "-d", "colours", "--reps", "0"], "--reps must be at least 1"),
    ("eval device mps", ["eval", M, "-d", "colours", "--device", "mps"], "unknown device 'mps'"),
    ("eval unreadable image", ["eval", M, "-d", "badcol", "--workers", "0"], "broken.png"),
    ("eval unreadable image, workers", ["eval", M, "-d", "badcol", "--workers", "1"], "cannot read image"),
    ("eval decompression bomb", ["eval", M, "-d", "bombcol", "--workers", "0"], "larger than PIL's safety limit"),
    ("eval report is a file", ["eval", M, "-d", "colours", "--report", "afile"], "is a file, not a folder"),
    ("eval unknown split", ["eval", M, "-d", "colours", "--split", "nosuch", "--workers", "0"],
     "has no split 'nosuch'"),
    ("eval data set with brackets", ["eval", M, "-d", "./data[v2]"], "./data[v2] does not exist"),
    ("eval empty layers", ["eval", M, "-d", "colours", "-l", ""], "--layers is empty"),
    ("eval wrong image column", ["eval", M, "-d", "colours", "--image-column", "pic", "--workers", "0"],
     "'pic' is not a column"),
    # sweep
    ("sweep keep rates empty", ["sweep", M, "--keep-rates", "", "-o", "sw"], "--keep-rates is empty"),
    ("sweep empty entry", ["sweep", M, "--keep-rates", "0.5,,0.7", "-o", "sw"], "has an empty entry"),
    ("sweep keep rate nan", ["sweep", M, "--keep-rates", "nan", "-o", "sw"], "outside (0, 1]"),
    ("sweep keep rate above 1", ["sweep", M, "--keep-rates", "0.5,1.5", "-o", "sw"], "outside (0, 1]"),
    ("sweep reps 0", ["sweep", M, "--reps", "0", "-o", "sw"], "--reps must be at least 1"),
    ("sweep batch 0", ["sweep", M, "--batch", "0", "-o", "sw"], "--batch must be at least 1"),
    ("sweep workers negative", ["sweep", M, "--workers", "-1", "-o", "sw"], "--workers must be 0 or more"),
    ("sweep limit 0", ["sweep", M, "--limit", "0", "-o", "sw"], "--limit must be at least 1"),
    ("sweep device mps", ["sweep", M, "--device", "mps", "-o", "sw"], "unknown device 'mps'"),
    ("sweep output is a file", ["sweep", M, "-o", "afile"], "is a file, not a folder"),
    ("sweep output below a file", ["sweep", M, "-o", "afile/sw"], "afile is a file"),
    ("sweep unreadable image",
     ["sweep", M, "-d", "badcol", "--workers", "0", "--reps", "1", "--keep-rates", "0.5", "-o", "sw"], "broken.png"),
    ("sweep skip without data set", ["sweep", M, "--skip-bad-images", "-o", "sw"], "give --dataset"),
    # search
    ("search target nan", ["search", M, "--target-gmacs", "nan"], "--target-gmacs must be a finite number"),
    ("search target inf", ["search", M, "--target-gmacs", "inf"], "must be a finite number"),
    ("search target negative", ["search", M, "--target-gmacs", "-1"], "--target-gmacs must be above 0"),
    ("search target 0", ["search", M, "--target-gmacs", "0"], "must be above 0"),
    ("search speedup 0", ["search", M, "--target-speedup", "0"], "--target-speedup must be above 0"),
    ("search both targets", ["search", M, "--target-gmacs", "1", "--target-speedup", "2"], "give one target"),
    ("search reps 0", ["search", M, "--target-gmacs", "1", "--reps", "0"], "--reps must be at least 1"),
    ("search batch 0", ["search", M, "--target-gmacs", "1", "--batch", "0"], "--batch must be at least 1"),
    ("search device mps", ["search", M, "--target-gmacs", "1", "--device", "mps"], "unknown device"),
    ("search unreachable: raise it", ["search", M, "--target-gmacs", "0.0001"],
     "raise the target or choose earlier layers"),
    ("search layers and search-layers", ["search", M, "--target-gmacs", "1", "--search-layers", "-l", "2,4"],
     "drop --layers"),
    # visualize
    ("visualize decompression bomb", ["visualize", M, "bomb.png", "-o", "v.png"], "larger than PIL's safety limit"),
    ("visualize missing image", ["visualize", M, "nope.jpg", "-o", "v.png"], "cannot read image nope.jpg"),
    ("visualize a folder as image", ["visualize", M, "colours", "-o", "v.png"], "cannot read image colours"),
    ("visualize output below a file", ["visualize", M, "bad.jpg", "-o", "afile/v.png"], "afile is a file"),
    ("visualize output is a folder", ["visualize", M, "bad.jpg", "-o", "existing"], "is a folder"),
    ("visualize keep rate 0", ["visualize", M, "bad.jpg", "-k", "0", "-o", "v.png"], "outside (0, 1]"),
    ("visualize no images", ["visualize", M], "Missing argument"),
    # export
    ("check batches empty entry", ["export", M, "--check-batches", "1,,8"], "comma-separated integers"),
    ("check batch 0", ["export", M, "--check-batches", "0"], "--check-batches must be at least 1"),
    ("check batch negative", ["export", M, "--check-batches", "-1"], "at least 1"),
    ("export output below a file", ["export", M, "-f", "torchscript", "-o", "afile/m.pt"], "afile is a file"),
    ("export output is a folder", ["export", M, "-f", "torchscript", "-o", "existing"], "is a folder"),
    ("export evit.json not JSON", ["export", "notjson", "-f", "torchscript"], "is not valid JSON"),
    ("export incomplete evit.json", ["export", "nokeys", "-f", "torchscript"], "is incomplete"),
    # info
    ("info bench.json corrupt", ["info", "badbench"], "badbench/bench.json is not valid JSON"),
    ("info metrics.json corrupt", ["info", "badmetrics"], "metrics.json is not valid JSON"),
    ("info evit.json corrupt", ["info", "notjson"], "is not valid JSON"),
    ("info evit.json incomplete", ["info", "nokeys"], "is incomplete"),
    ("info on a file", ["info", "afile"], "has no evit.json"),
    ("info missing folder", ["info", "gone"], "has no evit.json"),
    # finetune: every numeric option at its edge
    ("finetune workers negative", F + ["--workers", "-1"], "--workers must be 0 or more"),
    ("finetune lr negative", F + ["--lr", "-1"], "--lr must be above 0"),
    ("finetune lr 0", F + ["--lr", "0"], "--lr must be above 0"),
    ("finetune lr nan", F + ["--lr", "nan"], "--lr must be a finite number"),
    ("finetune val fraction 1.5", F + ["--val-fraction", "1.5"], "between 0 and 1"),
    ("finetune val fraction 0", F + ["--val-fraction", "0"], "between 0 and 1"),
    ("finetune val fraction 1", F + ["--val-fraction", "1"], "between 0 and 1"),
    ("finetune smoothing 1", F + ["--smoothing", "1"], "--smoothing must be at least 0 and below 1"),
    ("finetune smoothing negative", F + ["--smoothing", "-0.1"], "at least 0 and below 1"),
    ("finetune randaugment garbage", F + ["--randaugment", "garbage"], "is not a timm RandAugment policy"),
    ("finetune epochs 0", F + ["--epochs", "0"], "--epochs must be above 0"),
    ("finetune epochs inf", F + ["--epochs", "inf"], "finite number"),
    ("finetune accum steps 0", F + ["--accum-steps", "0"], "--accum-steps must be at least 1"),
    ("finetune mixup negative", F + ["--mixup", "-1"], "--mixup must be 0 or more"),
    ("finetune distill alpha 2", F + ["--distill-alpha", "2"], "--distill-alpha must be between 0 and 1"),
    ("finetune distill tau 0", F + ["--distill-tau", "0"], "--distill-tau must be above 0"),
    ("finetune device mps", F + ["--device", "mps"], "unknown device 'mps'"),
    ("finetune seed negative", F + ["--seed", "-1"], "--seed must be 0 or more"),
    ("finetune save every negative", F + ["--save-every", "-1"], "--save-every must be 0 or more"),
    ("finetune steps per epoch 0", F + ["--steps-per-epoch", "0"], "--steps-per-epoch must be at least 1"),
    ("finetune bench batch 0", F + ["--bench-batch", "0"], "--bench-batch must be at least 1"),
    ("finetune warmup epochs negative", F + ["--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more"),
    ("finetune min lr above lr", F + ["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr"),
    ("finetune empty keep-rate entry", F + ["-k", "0.7,,0.5"], "has an empty entry"),
    ("finetune output is a file", ["finetune", M, "--dataset", "colours", "-o", "afile"], "is not a folder"),
    ("finetune output below a file", ["finetune", M, "--dataset", "colours", "-o", "afile/ft"], "afile is a file"),
    ("finetune without output", ["finetune", M, "--dataset", "colours"], "no output folder"),
    ("finetune unreadable image", ["finetune", M, "--dataset", "badcol", "-o", "ft", "--workers", "0", "-b", "4",
                                   "--no-bench"], "broken.png"),
    # recipes: the same checks as the flags
    ("recipe epochs abc", F + ["--recipe", "r_epochs.yaml"], "--epochs must be a number, got 'abc'"),
    ("recipe workers negative", F[:-2] + ["--recipe", "r_workers.yaml"], "--workers must be 0 or more"),
    ("recipe keep rate not a number", F + ["--recipe", "r_keep.yaml"], "--keep-rate must be numbers"),
    ("recipe smoothing 1", F + ["--recipe", "r_smooth.yaml"], "--smoothing must be at least 0 and below 1"),
    ("recipe lr nan", F + ["--recipe", "r_lr.yaml"], "--lr must be a finite number"),
    ("recipe batch size 2.5", F + ["--recipe", "r_batch.yaml"], "--batch-size must be an integer"),
    ("recipe amp as text", F + ["--recipe", "r_amp.yaml"], "--amp must be true or false"),
    ("recipe layers as text", F + ["--recipe", "r_layers.yaml"], "comma-separated block numbers"),
    ("recipe a list", F + ["--recipe", "r_list.yaml"], "must be a mapping"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in NEW_CASES], ids=[c[0] for c in NEW_CASES])
def test_more_bad_input(args, message, ws, capsys, monkeypatch):
    test_bad_input(args, message, ws, capsys, monkeypatch)


def test_at_least_a_hundred_new_cases():
    assert len(NEW_CASES) >= 100 and len({c[0] for c in NEW_CASES}) == len(NEW_CASES)


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


# --------------------------------------------------------------------------- the error boundary


def _boom(*a, **k):
    raise RuntimeError("boom\nsecond line")


def test_a_bug_is_one_line_exit_1_naming_debug(ws, capsys, monkeypatch, tmp_path):
    import evit_cli.model.convert

    monkeypatch.setattr(evit_cli.model.convert, "convert_keeping", _boom)
    code, _, stderr = run(["convert", ws / M, "-o", tmp_path / "o"], capsys)
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "RuntimeError: boom" in stderr and "--debug" in stderr and "EVIT_DEBUG=1" in stderr
    assert "Traceback" not in stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, ws, capsys, monkeypatch, tmp_path):
    import evit_cli.model.convert

    monkeypatch.setattr(evit_cli.model.convert, "convert_keeping", _boom)
    args = ["convert", ws / M, "-o", tmp_path / "o"]
    if how == "flag":
        args.append("--debug")
    else:
        monkeypatch.setenv("EVIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        run(args, capsys)


def test_out_of_memory_says_lower_the_batch(ws, capsys, monkeypatch):
    import importlib

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(importlib.import_module("evit_cli.measure.bench"), "time_side_by_side", oom)
    code, _, stderr = run(["bench", ws / M, "--batch", "100000", "--report", ws / "never"], capsys)
    assert code == 2 and "lower --batch" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (ws / "never").exists()


def test_sigterm_during_convert_leaves_no_temp_folder(ws, capsys, monkeypatch, tmp_path):
    import signal

    import safetensors.torch

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler main() installs raises KeyboardInterrupt here

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    before = signal.getsignal(signal.SIGTERM)
    code, _, stderr = run(["convert", ws / M, "-o", tmp_path / "out"], capsys)
    assert code == 130 and stderr.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []  # no hidden .out.*.tmp folder
    assert signal.getsignal(signal.SIGTERM) == before


def test_outputs_respect_the_umask(ws, capsys, tmp_path):
    old = os.umask(0o022)
    try:
        code, _, _ = run(["convert", ws / M, "-o", tmp_path / "out"], capsys)
        code2, _, _ = run(["export", tmp_path / "out", "-f", "torchscript", "--check-batches", "1"], capsys)
    finally:
        os.umask(old)
    assert code == code2 == 0
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


# --------------------------------------------------------------------------- what still works


def test_unicode_spaces_and_brackets_in_paths_and_spaced_layers(ws, capsys, tmp_path):
    out = tmp_path / "mödel [v2] ünïcode"
    code, stdout, stderr = run(["convert", ws / M, "-l", " 2, 4", "-k", " 0.6 , 0.5", "-o", out], capsys)
    assert code == 0, stderr
    assert evit_cli.model_state(evit_cli.load(out)).config.layers == (2, 4)
    assert "[v2]" in stdout.replace("\n", "")  # printed as written, not eaten as markup
    code, stdout, _ = run(["info", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["folder"] == str(out)


def test_skip_bad_images_reports_the_count(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    code, stdout, stderr = run(["eval", M, "-d", "badcol", "--workers", "0", "--reps", "1", "--batch", "8",
                                "--skip-bad-images", "--json"], capsys)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["skipped_images"] == 1 and result["images"] == 9


def test_help_is_plain_text_with_defaults_and_an_example(capsys):
    for cmd in ("convert", "bench", "finetune", "eval", "sweep", "search", "visualize", "export", "info"):
        code, stdout, _ = run([cmd, "--help"], capsys)
        assert code == 0 and "Example: evit " in stdout, cmd
        text = " ".join(stdout.split())
        if cmd == "finetune":
            assert "[default: 0.1]" in text and "[default: 2]" in text and "[default: 5e-5" in text
        if cmd == "bench":
            assert "[default: 256]" in text
    code, stdout, _ = run([], capsys)
    assert code == 0 and "Commands:" in stdout


def test_missing_extra_hint_keeps_its_brackets(ws, capsys, monkeypatch):
    import evit_cli.io.export

    def no_onnx(*a, **k):
        raise evit_cli.EvitError("ONNX export needs the onnx extra: pip install 'evit-cli[onnx]'")

    monkeypatch.setattr(evit_cli.io.export, "_export_onnx", no_onnx)
    code, _, stderr = run(["export", ws / M, "-f", "onnx", "-o", ws / "x.onnx"], capsys)
    assert code == 2 and "pip install 'evit-cli[onnx]'" in stderr
    assert not (ws / "x.onnx").exists()


# --------------------------------------------------------------------------- progress and tables


def test_progress_without_a_terminal_is_timestamped_lines_and_json_stays_pure(ws, capsys, monkeypatch):
    import re

    monkeypatch.setenv("EVIT_PROGRESS_INTERVAL", "0")
    monkeypatch.chdir(ws)
    code, stdout, stderr = run(["eval", M, "-d", "colours", "--workers", "0", "--reps", "1", "--batch", "2",
                                "--json"], capsys)
    assert code == 0
    json.loads(stdout)
    lines = stderr.strip().splitlines()
    assert any(re.match(r"^\[\d\d:\d\d:\d\d\] eval dense and EViT: \d+/9 images, [\d.]+ images/s, ETA \d", x)
               for x in lines), stderr
    assert any(re.match(r"^\[\d\d:\d\d:\d\d\] eval dense and EViT: 9/9 images, .* done in \d", x) for x in lines)
    assert any("bench dense vs EViT" in x for x in lines)


def test_tables_fit_80_columns_without_ellipsis(ws):
    import io

    from rich.console import Console

    from evit_cli.measure.report import bench_table, kv_table, sweep_table

    r = evit_cli.bench(evit_cli.load(ws / M), batch=2, reps=1, warmup=0)
    r.update(batch=256, model="hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k")
    r["evit_model"]["tokens"] = [197, 140, 100, 72]
    for key in ("dense", "evit_model"):
        for lat in ("latency", "latency_b1"):
            r[key][lat].update(median_ms=12345.6, min_ms=10234.5, max_ms=15234.9)
    rows = [{"model": "evit", "keep_rate": k, "gmacs": 3.0303, "images_per_s": 1234.5, "speedup": 1.5,
             "top1": 79.5, "top5": 94.2} for k in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    sweep = {"model": "deit_small_patch16_224", "img_size": 224, "layers": [4, 7, 10], "batch": 64, "rows": rows}
    info = kv_table("evit info ./data[v2]", {"gmacs": 4.60123456789123, "tokens": [197, 140],
                                               "bench": {"speedup": 1.61234567,
                                                         "device_name": "AMD EPYC 7B13, 2 threads"}})
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    for table in (bench_table(r), sweep_table(sweep), info):
        console.print(table)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    assert "197→140→100→72" in text and "12346 (10234-15235)" in text  # whole cells, nothing cut
    assert "4.601" in text and "4.6012" not in text and "1.612" in text and "./data[v2]" in text
