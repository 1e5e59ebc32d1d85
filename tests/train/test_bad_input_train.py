"""Bad training input through the CLI: corrupt resume states and degenerate data sets. Each is one
line on stderr, exit 2, no traceback, and no file written, changed or removed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_timm
from test_cli import run
from test_train import write_colour_folder

import evit_cli

M = "m"
RUN = ["--dataset", "colours", "--workers", "0", "--no-bench", "--epochs", "2", "-b", "4", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model, a colour folder, a finished 2-epoch run, and data sets that cannot train."""
    root = tmp_path_factory.mktemp("ws_train")
    evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2, 4)), root / M)
    write_colour_folder(root / "colours", 3)
    done = subprocess.run([sys.executable, "-m", "evit_cli", "finetune", M, *RUN, "-o", "done"], cwd=root,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _data_sets(root)
    return root


def _data_sets(root):
    import datasets

    for d in ("allbad/a", "allbad/b", "allbad_flat"):  # every image unreadable
        (root / d).mkdir(parents=True)
        for i in range(4):
            (root / d / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    full = datasets.load_dataset("imagefolder", data_dir=str(root / "colours"))["train"]
    ints = full.cast_column("label", datasets.Value("int64"))
    ints.filter(lambda r: r["label"] == 0).save_to_disk(str(root / "oneclass"))  # labels 0 only: class '0'
    other = ints.select(range(3)).map(lambda r: {"label": 7})
    datasets.DatasetDict(train=ints, validation=other).save_to_disk(str(root / "val_label_7"))
    unlabelled = full.select(range(2)).map(lambda r: {"label": -1})  # datasets' "no label"
    train = datasets.concatenate_datasets([full, unlabelled])
    datasets.DatasetDict(train=train, validation=full.select(range(3))).save_to_disk(str(root / "train_label_-1"))
    colours = sorted((root / "colours").iterdir())
    shutil.copytree(colours[0], root / "oneclassfolder" / colours[0].name)  # a labelled folder of one class
    shutil.copytree(root / "colours", root / "emptyclassfolder")
    (root / "emptyclassfolder" / "zebra").mkdir()  # a class folder without an image
    (root / "oneimage").mkdir()
    shutil.copy(next(colours[0].iterdir()), root / "oneimage")
    (root / "pq").mkdir()
    ints.to_parquet(str(root / "pq" / "train.parquet"))
    ints.select([]).to_parquet(str(root / "pq" / "validation.parquet"))


def _resume_case(root, name, spoil):
    """A copy of the finished run (export and training folder), spoiled by ``spoil(out, train_dir)``."""
    out, train_dir = root / name, root / f"{name}.train"
    if not train_dir.exists():
        shutil.copytree(root / "done", out)
        shutil.copytree(root / "done.train", train_dir)
        spoil(out, train_dir)
    return ["finetune", M, *RUN, "-o", name, "--resume"]


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def _other_architecture(out, train_dir):
    """The checkpoint of a model 192 wide, resumed with one of the same name 96 wide."""
    state = torch.load(train_dir / "checkpoint.pt", weights_only=True)
    state["model"] = {k: torch.zeros(*v.shape[:-1], 2 * v.shape[-1]) if v.ndim else v
                      for k, v in state["model"].items()}
    torch.save(state, train_dir / "checkpoint.pt")


RESUME = {
    "empty checkpoint": (lambda o, t: (t / "checkpoint.pt").write_bytes(b""), "checkpoint.pt is empty (0 bytes)"),
    "truncated checkpoint": (lambda o, t: _cut(t / "checkpoint.pt", lambda n: n // 2), "cannot be read"),
    "checkpoint cut to its head": (lambda o, t: _cut(t / "checkpoint.pt", lambda n: 100), "cannot be read"),
    "checkpoint of text": (lambda o, t: (t / "checkpoint.pt").write_text("hello\n"), "cannot be read"),
    "checkpoint of another kind": (lambda o, t: torch.save({"state_dict": {}}, t / "checkpoint.pt"),
                                   "not an evit training checkpoint (no model, optimizer"),
    "checkpoint with a step that is not a count": (
        lambda o, t: torch.save({**torch.load(t / "checkpoint.pt", weights_only=True), "step": -3},
                                t / "checkpoint.pt"),
        "not a count"),
    "checkpoint of another architecture": (_other_architecture, "does not fit this model (size mismatch"),
    "output folder removed": (lambda o, t: shutil.rmtree(o), "output folder"),
    "settings file removed": (lambda o, t: (o / "train_config.json").unlink(), "train_config.json is missing"),
    "settings file not JSON": (lambda o, t: (o / "train_config.json").write_text("{\"model\": "),
                               "train_config.json is not the run's settings"),
    "settings file a list": (lambda o, t: (o / "train_config.json").write_text("[1, 2]"), "is not the run's settings"),
    "step log with a garbage line": (lambda o, t: (o / "train_log.jsonl").write_text(
        "garbage\n" + (o / "train_log.jsonl").read_text()), "line 1 of"),
    "step log emptied": (lambda o, t: (o / "train_log.jsonl").write_text(""), "holds 0 of the 4 steps"),
    "metrics log removed": (lambda o, t: (o / "metrics.jsonl").unlink(), "holds 0 of the 2 epochs"),
    "metrics log of lists": (lambda o, t: (o / "metrics.jsonl").write_text("[1]\n[2]\n"), "not a row of the run's log"),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_a_corrupt_resume_state_is_one_line_and_changes_nothing(name, ws, capsys, monkeypatch):
    spoil, message = RESUME[name]
    folder = "r_" + "".join(c if c.isalnum() else "_" for c in name)
    args = _resume_case(ws, folder, spoil)
    _refused(args, message, ws, capsys, monkeypatch)


SETTINGS = [
    ("another keep rate", ["-k", "0.5"], "started with --keep-rate (not given), these settings give 0.5"),
    ("another batch size", ["-b", "2"], "started with --batch-size 4, these settings give 2"),
    ("another seed", ["--seed", "5"], "started with --seed 0, these settings give 5"),
    ("another data set", ["--dataset", "allbad"], "started with --dataset"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_resuming_with_other_settings_is_refused(args, message, ws, capsys, monkeypatch):
    base = _resume_case(ws, "r_settings", lambda o, t: None)
    _refused(base + args, message, ws, capsys, monkeypatch)


def test_resuming_another_model_is_refused(ws, capsys, monkeypatch):
    evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2,)), ws / "m_other")
    args = _resume_case(ws, "r_settings", lambda o, t: None)
    args[1] = "m_other"
    _refused(args, "started with MODEL", ws, capsys, monkeypatch)


F = ["finetune", M, "--workers", "0", "--no-bench", "--epochs", "1", "-o", "ft"]
DATA = [
    ("one class of labels", ["--dataset", "oneclass", "-b", "2"], "the training split has a single class ('0')"),
    ("validation labels outside the classes", ["--dataset", "val_label_7", "-b", "2"],
     "the validation split has labels [7] outside the data set's 3 classes"),
    ("training labels of -1", ["--dataset", "train_label_-1", "-b", "2"], "the training split has labels [-1]"),
    ("empty validation split", ["--dataset", "pq", "-b", "2"], '"validation" corresponds to no data'),
    ("fewer images than a batch", ["--dataset", "colours", "-b", "16"],
     "the training split has 8 images, fewer than one step takes (--batch-size 16 x --accum-steps 1)"),
    ("fewer images than accumulated batches", ["--dataset", "colours", "-b", "4", "--accum-steps", "3"],
     "fewer than one step takes (--batch-size 4 x --accum-steps 3)"),
    ("fewer images than a batch, given steps", ["--dataset", "colours", "-b", "16", "--steps-per-epoch", "2"],
     "fewer than one step takes"),
    ("every image unreadable, skipped", ["--dataset", "allbad", "-b", "2", "--skip-bad-images"],
     "could not be decoded and were skipped"),
    ("every image unreadable", ["--dataset", "allbad", "-b", "2"], "cannot read image"),
    ("a labelled folder of one class", ["--dataset", "oneclassfolder", "-b", "2"],
     "has a single class folder ('blue')"),
    ("a class folder without an image", ["--dataset", "emptyclassfolder", "-b", "2"],
     "class folder 'zebra' of emptyclassfolder holds no image"),
    ("a folder of one image", ["--dataset", "oneimage", "-b", "1"], "oneimage holds a single image"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in DATA], ids=[c[0] for c in DATA])
def test_a_data_set_that_cannot_train_is_one_line_and_leaves_nothing(args, message, ws, capsys, monkeypatch):
    _refused(F + args, message, ws, capsys, monkeypatch)


E = ["eval", M, "--workers", "0", "--report", "ev"]
EVAL = [
    ("labels of one class", ["--dataset", "oneclass"],
     "the evaluation split (split 'train' (all of it)) holds a single class ('0'): top-1 over one class says nothing"),
    ("a labelled folder of one class", ["--dataset", "oneclassfolder"], "has a single class folder ('blue')"),
    ("a class folder without an image", ["--dataset", "emptyclassfolder"],
     "class folder 'zebra' of emptyclassfolder holds no image"),
    ("a folder of one image", ["--dataset", "oneimage"], "oneimage holds a single image"),
    ("every image unreadable", ["--dataset", "allbad_flat"], "cannot read image"),
    ("every image unreadable, skipped", ["--dataset", "allbad_flat", "--skip-bad-images"],
     "none of the 4 images could be decoded (all were skipped)"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in EVAL], ids=[c[0] for c in EVAL])
def test_a_data_set_that_cannot_be_evaluated_is_one_line_and_leaves_nothing(args, message, ws, capsys, monkeypatch):
    _refused(E + args, message, ws, capsys, monkeypatch)


def test_an_empty_validation_split_is_refused_before_training():
    """The data loaders refuse an empty split of a folder; a data set built in code reaches the check."""
    import datasets

    from evit_cli.io.datasets import ImageData
    from evit_cli.train.setup import Setup, check_data

    train = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "label": [0, 1]})
    data = ImageData(train, train.select([]), "image", "label", ["a", "b"], "split 'validation'")
    with pytest.raises(evit_cli.EvitError, match=r"the validation split \(split 'validation'\) has no images"):
        check_data(Setup(None, None, data, "new", None, None, "", None))
    check_data(Setup(None, None, ImageData(train, train, "image", "label", ["a", "b"]), "new", None, None, "", None))


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(ws, capsys, monkeypatch):
    (ws / "old").mkdir(exist_ok=True)
    (ws / "old" / "keep.txt").write_text("an earlier run\n")
    args = ["finetune", M, "--dataset", "colours", "--workers", "0", "-b", "16", "-o", "old", "--overwrite"]
    _refused(args, "fewer than one step takes", ws, capsys, monkeypatch)


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(ws, capsys, monkeypatch):
    """A kill while a log row is written leaves half a line after the checkpoint: resuming drops it."""
    def cut_row(out, train_dir):
        with open(out / "train_log.jsonl", "a") as f:
            f.write('{"step": 4, "ep')

    args = _resume_case(ws, "r_torn", cut_row)
    monkeypatch.chdir(ws)
    code, _, err = run(args, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (ws / "r_torn" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _refused(args, message, ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(ws)
    code, _, stderr = run(args, capsys)
    assert code == 2, stderr
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert _snapshot(ws) == before  # nothing written, changed or removed
