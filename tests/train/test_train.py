"""`evit finetune`: learning, the keep-rate schedule, resume after a kill, DDP, data formats, recipes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_timm
from PIL import Image
from safetensors.torch import load_file

import evit_cli
from evit_cli.cli.finetune import finetune_and_bench as finetune  # what `evit finetune` runs: train, then bench
from evit_cli.train import TrainConfig, load_recipe

ROOT = Path(__file__).resolve().parents[2]
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_colour_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """An image folder where the class is the dominant colour, under heavy noise."""
    rng = np.random.default_rng(seed)
    for name, c in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(0, 60, (32, 32, 3)) + np.array(c), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("data") / "colours", 30)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny ViT with 5 classes (the data has 3: the head gets replaced), EViT at 0.5."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    return evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2, 4)), folder)


def base_config(model, data, out, **kw) -> TrainConfig:
    values = dict(model=str(model), dataset=str(data), output=str(out), epochs=3, batch_size=8, lr=1e-3,
                  workers=0, bench=False, seed=0)
    values.update(kw)
    return TrainConfig(**values)


def test_learns_a_colour_task_with_evit_active(tiny_model, colours, tmp_path):
    out = tmp_path / "run"
    final = finetune(base_config(tiny_model, colours, out, shrink_epochs=1, bench=True, bench_batch=4))
    assert final["top1"] >= 80.0  # chance is 33%
    assert final["keep_rate"] == [0.5, 0.5]
    model = evit_cli.load(out)  # the output folder is an exported model
    assert evit_cli.tokens_after_layers(model) == [1 + 32 + 1, 1 + 17 + 1]
    meta = json.loads((out / "evit.json").read_text())
    assert meta["class_names"] == ["blue", "green", "red"] and meta["num_classes"] == 3
    assert json.loads((out / "metrics.json").read_text())["top1"] == final["top1"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "bench.json").read_text())["batch"] == 4


def test_logged_keep_rate_follows_the_formula_every_step(tiny_model, colours, tmp_path):
    out = tmp_path / "sched"
    cfg = base_config(tiny_model, colours, out, epochs=4, shrink_start=1, shrink_epochs=1.5, keep_rate="0.7,0.4")
    finetune(cfg)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    per_epoch = 81 // 8  # 90 images, 9 held out for validation, batch 8, last partial batch dropped
    assert [r["step"] for r in rows] == list(range(4 * per_epoch))
    for r in rows:
        for target, got in zip((0.7, 0.4), r["keep_rate"]):
            # docs/algorithm.md, written out independently: 1.0, then a cosine over 1.5 epochs, then the target
            epochs_done = r["step"] / per_epoch
            if epochs_done < 1:
                want = 1.0
            elif epochs_done < 2.5:
                t = (r["step"] - per_epoch) / (1.5 * per_epoch)
                want = target + (1 - target) * (1 + math.cos(math.pi * t)) / 2
            else:
                want = target
            assert got == pytest.approx(want, abs=1e-12)


def _cli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "evit_cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_mid_epoch_with_workers_then_resume_ends_bit_for_bit_like_an_uninterrupted_run(tiny_model, colours,
                                                                                            tmp_path):
    # two loader workers and random crops and flips: each image's augmentation must depend on
    # (seed, epoch, index) only, not on which worker drew it after the resume
    args = ["finetune", tiny_model, "--dataset", colours, "--epochs", 2, "--batch-size", 4, "--lr", 1e-3,
            "--workers", 2, "--save-every", 1, "--no-bench", "--seed", 3]
    full = _cli([*args, "-o", tmp_path / "full"])
    assert full.wait(timeout=600) == 0, full.stderr.read()

    proc = _cli([*args, "-o", tmp_path / "cut"])
    progress = tmp_path / "cut.train" / "progress.json"  # the checkpoint lives beside the export
    deadline = time.time() + 300
    while time.time() < deadline:
        if progress.is_file():
            p = json.loads(progress.read_text())
            if p["step"] >= 5 and p["step_in_epoch"] > 0:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # killed before the end
    resumed = _cli([*args, "-o", tmp_path / "cut", "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) == 2 * (81 // 4)  # no step twice
    for name in ("metrics.json",):
        assert (json.loads((tmp_path / "cut" / name).read_text())["step"]
                == json.loads((tmp_path / "full" / name).read_text())["step"])
    ckpt = torch.load(tmp_path / "cut.train" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == len(steps)
    assert json.loads(progress.read_text())["step"] == ckpt["step"]
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # not inside the exported model
    a, b = load_file(tmp_path / "cut" / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_torchrun_two_cpu_processes_write_one_output(tiny_model, colours, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "evit_cli", "finetune", str(tiny_model), "--dataset", str(colours), "--epochs", "2",
         "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--no-bench", "-o", str(tmp_path / "ddp"), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout)  # only rank 0 printed
    assert final["images"] == 10  # 9 held-out images, padded to 5 per rank
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(2 * (41 // 4)))  # 81 images over 2 ranks: 41 each, batch 4
    evit_cli.load(tmp_path / "ddp")


def test_data_formats_and_columns(tmp_path, colours):
    import datasets

    from evit_cli.io.datasets import load_image_data

    folder = load_image_data(str(colours))
    assert folder.class_names == ["blue", "green", "red"] and len(folder.val) == 9
    ds = datasets.load_dataset("imagefolder",
                               data_dir=str(colours))["train"].rename_columns({"image": "img", "label": "y"})
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = load_image_data(str(tmp_path / "saved"))
    assert (saved.image_column, saved.label_column) == ("img", "y")
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    pq = load_image_data(str(tmp_path / "pq"), val_fraction=0.2)
    assert pq.num_classes == 3 and len(pq.val) == 18
    ds.remove_columns("y").save_to_disk(str(tmp_path / "nolabel"))
    unlabelled = load_image_data(str(tmp_path / "nolabel"))  # no labels: trained by distillation alone
    assert unlabelled.label_column is None and not unlabelled.labelled and unlabelled.class_names == []
    with pytest.raises(evit_cli.EvitError, match="--label-column 'y'"):
        load_image_data(str(tmp_path / "nolabel"), label_column="y")
    with pytest.raises(evit_cli.EvitError, match="--image-column 'photo'"):
        load_image_data(str(tmp_path / "saved"), image_column="photo")


def test_streaming_parquet_trains_for_the_given_steps(tmp_path, colours, tiny_model):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(colours))["train"].train_test_split(test_size=0.2, seed=0)
    (tmp_path / "pq").mkdir()
    ds["train"].to_parquet(str(tmp_path / "pq" / "train.parquet"))
    ds["test"].to_parquet(str(tmp_path / "pq" / "validation.parquet"))
    final = finetune(base_config(tiny_model, tmp_path / "pq", tmp_path / "s", epochs=2, streaming=True,
                                 steps_per_epoch=4))
    assert final["step"] == 8 and final["images"] == 18
    with pytest.raises(evit_cli.EvitError, match="--steps-per-epoch"):
        finetune(base_config(tiny_model, tmp_path / "pq", tmp_path / "s2", streaming=True))


def test_recipes_load_and_flags_override():
    recipes = sorted((ROOT / "recipes").glob("deit_*.yaml"))
    assert [p.name for p in recipes] == ["deit_base.yaml", "deit_small.yaml", "deit_small_from_scratch.yaml"]
    for path in recipes:
        cfg = TrainConfig.merged(load_recipe(path), {"dataset": "x"})
        assert cfg.layers == "4,7,10" and cfg.keep_rate == 0.7
    for size in ("small", "base"):  # the paper's keep rates: one recipe per model, the rate a flag
        for rate in (0.5, 0.6, 0.7, 0.8, 0.9):
            cfg = TrainConfig.merged(load_recipe(ROOT / "recipes" / f"deit_{size}.yaml"), {"keep_rate": rate})
            assert cfg.keep_rate == rate and cfg.model == f"deit_{size}_patch16_224" and cfg.epochs == 30
    cfg = TrainConfig.merged(load_recipe(ROOT / "recipes" / "deit_small.yaml"), {"epochs": 2, "lr": None})
    assert (cfg.epochs == 2 and cfg.lr_per_512 == 2e-5 and cfg.weight_decay == 1e-6
            and cfg.model == "deit_small_patch16_224")
    with pytest.raises(evit_cli.EvitError, match="unknown recipe keys"):
        TrainConfig.merged({"learning_rate": 1}, {})


def test_a_flag_given_with_a_recipe_overrides_it(tiny_model, colours, tmp_path, capsys, monkeypatch):
    from test_cli import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model}\nkeep_rate: 0.9\nepochs: 5\nbatch_size: 16\nworkers: 0\nlr: 1.0e-3\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["finetune", "--recipe", recipe, "--dataset", colours, "-k", "0.5", "--epochs", "1",
                        "--no-bench", "-o", tmp_path / "o"], capsys)
    assert code == 0, err
    settings = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert (settings["keep_rate"], settings["epochs"], settings["batch_size"]) == ("0.5", 1.0, 16)
    assert not (tmp_path / "o" / "bench.json").exists()  # --no-bench over the default
    assert evit_cli.model_state(evit_cli.load(tmp_path / "o")).config.keep_rates == (0.5, 0.5)


def test_each_option_is_declared_once_as_a_field():
    """The flags of `evit finetune` are TrainConfig's fields: same checks, the default in the help."""
    from dataclasses import fields

    import typer

    from evit_cli.cli import app

    command = typer.main.get_command(app).commands["finetune"]
    params = {p.name: p for p in command.params}
    for f in fields(TrainConfig):
        if not f.metadata["cli"] or f.metadata["argument"]:
            continue
        assert f.name in params, f.name
        if f.name not in ("resume", "overwrite"):  # bare flags: off unless given
            assert "[default: " in params[f.name].help, f.name
    assert params["weight_decay"].help.endswith("[default: 0.05]") and TrainConfig().weight_decay == 0.05
    assert set(params["batch_size"].opts) == {"-b", "--batch-size"}
    with pytest.raises(evit_cli.EvitError, match="--batch-size must be at least 1"):
        evit_cli.TrainConfig(batch_size=0)  # a library call is checked as the flag is
    with pytest.raises(evit_cli.EvitError, match="--keep-rate must be a number"):
        evit_cli.TrainConfig(keep_rate="high")


def test_the_defaults_are_the_recovery_recipe():
    from evit_cli.train.setup import resolve_lr

    recipe = load_recipe(ROOT / "recipes" / "recover.yaml")
    defaults = TrainConfig()
    assert {k: getattr(defaults, k) for k in recipe if k != "lr"} == {k: v for k, v in recipe.items() if k != "lr"}
    assert resolve_lr(defaults, 32)[:2] == (recipe["lr"], recipe["min_lr"]) == (5e-5, 1e-6)  # lr None: 5e-5
    # None: distil when possible
    assert (defaults.weight_decay, defaults.batch_size, defaults.distill) == (0.05, 32, None)
    assert resolve_lr(TrainConfig(lr_per_512=2e-5, min_lr=2e-6), 32)[:2] == (1.25e-6, 1.25e-6)  # clamped, not rising


def test_distill_from_the_dense_model_and_refuse_a_mismatched_teacher(colours, tmp_path):
    three = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.5, layers=(2,)),
                          tmp_path / "m3")
    # with alpha 1 the loss is the KL to the dense teacher alone; at keep rate 1.0 the student is
    # the teacher, so the first step's loss is zero; with EViT active it is not
    finetune(base_config(three, colours, tmp_path / "d", epochs=1, distill=True, distill_alpha=1.0, keep_rate=1.0))
    first = json.loads((tmp_path / "d" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    finetune(base_config(three, colours, tmp_path / "d2", epochs=1, distill=True, distill_alpha=1.0, keep_rate=0.3))
    first = json.loads((tmp_path / "d2" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] > 1e-4
    five = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2,)), tmp_path / "m5")
    with pytest.raises(evit_cli.EvitError,
                       match="cannot distil: the teacher's 5 classes do not map onto the data set's 3"):
        finetune(base_config(five, colours, tmp_path / "e", epochs=1, distill=True))
