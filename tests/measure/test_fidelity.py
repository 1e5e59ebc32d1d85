"""Label-free fidelity (agreement, KL, cosine), label-free distillation, the head, provenance, --img-size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_timm
from PIL import Image
from test_cli import run
from test_train import write_colour_folder

import evit_cli
from evit_cli.model.convert import dense_copy
from evit_cli.train import TrainConfig, finetune

SYNSETS = ["n01440764", "n02102040", "n03888257"]  # ImageNet classes 0, 217, 701


def write_flat_folder(root: Path, n: int, seed: int = 0) -> Path:
    """A flat folder of n smooth random images (8x8 noise, upsampled): no class subfolders, so no labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        img = np.asarray(small.resize((32, 32), Image.BILINEAR))
        Image.fromarray(img).save(root / f"{i:03d}.png")
    return root


def independent_logits(model, folder: Path) -> torch.Tensor:
    """Logits on every image of a folder, preprocessed with timm's own eval transform for the model."""
    from timm.data import create_transform, resolve_data_config

    size = model.patch_embed.img_size
    tf = create_transform(**{**resolve_data_config(model=model), "input_size": (3, *size)}, is_training=False)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))])
    with torch.no_grad():
        return model.eval()(x)


def kl_and_agreement(dense: torch.Tensor, evit: torch.Tensor) -> tuple[float, float]:
    p, q = dense.softmax(-1), evit.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean().item()
    return kl, 100 * (dense.argmax(-1) == evit.argmax(-1)).float().mean().item()


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return write_flat_folder(tmp_path_factory.mktemp("flat") / "photos", 40)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return write_flat_folder(tmp_path_factory.mktemp("heldout") / "photos", 16, seed=1)


def test_eval_on_an_unlabelled_folder_reports_agreement_and_kl(tmp_path, heldout, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=7), keep_rate=0.3, layers=(2, 4)),
                           tmp_path / "m")
    code, stdout, err = run(["eval", folder, "--dataset", heldout, "--batch", 5, "--reps", 1, "--workers", 0, "--json"],
                            capsys)
    assert code == 0, err
    r = json.loads(stdout)
    model = evit_cli.load(folder)
    kl, agree = kl_and_agreement(independent_logits(dense_copy(model), heldout), independent_logits(model, heldout))
    assert r["images"] == 16 and r["labelled"] is False and r["training"] is None
    assert r["evit_model"]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert r["evit_model"]["agreement"] == pytest.approx(agree)
    assert kl > 1e-3  # keep 0.3 changes the outputs: the check can fail
    assert "top1" not in r["evit_model"]


def test_eval_of_a_headless_model_reports_embedding_cosine(tmp_path, heldout, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=0), keep_rate=0.3, layers=(2,)),
                           tmp_path / "m")
    code, stdout, err = run(["eval", folder, "--dataset", heldout, "--batch", 8, "--reps", 1, "--workers", 0, "--json"],
                            capsys)
    assert code == 0, err
    model = evit_cli.load(folder)
    a, b = independent_logits(model, heldout), independent_logits(dense_copy(model), heldout)
    want = F.cosine_similarity(a, b, dim=-1).mean().item()
    assert json.loads(stdout)["evit_model"]["cosine"] == pytest.approx(want, rel=1e-4)
    assert want < 0.9999


def test_label_free_distillation_lowers_kl_and_the_folder_says_how_it_was_made(tmp_path, flat, heldout, capsys):
    model = tiny_timm("vit", num_classes=7)
    with torch.no_grad():
        model.head.weight.mul_(5)  # confident classes, so that EViT's change shows in the KL
    start = evit_cli.save(evit_cli.convert(model, keep_rate=0.3, layers=(2, 4)), tmp_path / "m")
    out = tmp_path / "ft"
    final = finetune(TrainConfig(model=str(start), dataset=str(flat), output=str(out), epochs=4, batch_size=8,
                                 lr=3e-4, workers=0, bench=False))
    assert final["loss"] == "distillation only (no labels): MSE on the logits + 1 x MSE on the pre-logits features"
    assert "kept" in final["head"]
    assert "agreement" in final and "kl" in final and "top1" not in final
    dense = dense_copy(evit_cli.load(start))  # the teacher: the dense model before conversion
    before, _ = kl_and_agreement(independent_logits(dense, heldout), independent_logits(evit_cli.load(start), heldout))
    after, _ = kl_and_agreement(independent_logits(dense, heldout), independent_logits(evit_cli.load(out), heldout))
    assert after < 0.7 * before, (before, after)
    # provenance: evit.json, model card, info, eval; the checkpoint beside the export, not in it
    meta = json.loads((out / "evit.json").read_text())
    t = meta["training"]
    assert t["labels"] is False and t["distillation"]["teacher"] == "the dense model before conversion"
    assert (t["from"]["model"] == str(start) and t["dataset"] == str(flat)
            and t["steps"] == final["step"] == 4 * (36 // 8))
    assert ("held out" in t["metrics_split"]
            and json.loads((out / "metrics.json").read_text())["split"] == final["split"])
    card = (out / "README.md").read_text()
    assert "## Fine-tuning" in card and "none (unlabelled images)" in card
    assert not (out / "checkpoint.pt").exists() and (tmp_path / "ft.train" / "checkpoint.pt").is_file()
    code, stdout, err = run(["info", out, "--json"], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["weights"].startswith(f"fine-tuned from {start}") and "without labels" in info["training"]
    code, stdout, err = run(["eval", out, "--dataset", heldout, "--reps", 1, "--workers", 0, "--batch", 8], capsys)
    assert code == 0, err
    assert "no training" not in stdout and "fine-tuned on" in stdout


def test_head_auto_keeps_a_1000_class_head_on_synset_folders(tmp_path):
    data = tmp_path / "synsets"
    write_colour_folder(data, 8)
    for colour, synset in zip(("blue", "green", "red"), SYNSETS):
        (data / colour).rename(data / synset)
    start = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=1000), keep_rate=0.5, layers=(2,)),
                          tmp_path / "m")
    base = dict(model=str(start), dataset=str(data), epochs=1, batch_size=4, lr=1e-3, workers=0, bench=False)
    final = finetune(TrainConfig(output=str(tmp_path / "auto"), **base))
    assert final["head"].startswith("kept: the model's 1000 classes")
    assert final["loss"] == "labels and distillation: MSE on the logits + 1 x MSE on the pre-logits features"
    assert json.loads((tmp_path / "auto" / "evit.json").read_text())["num_classes"] == 1000
    assert 0 <= final["top1"] <= 100 and final["labelled_images"] == final["images"]
    # a new head maps the 1000-class teacher onto the 3 synsets
    final = finetune(TrainConfig(output=str(tmp_path / "new"), head="new", **base))
    assert final["head"] == "new: 3 classes from the data set"
    assert final["loss"] == "labels and distillation: MSE on the logits + 1 x MSE on the pre-logits features"
    assert json.loads((tmp_path / "new" / "evit.json").read_text())["num_classes"] == 3


def test_new_head_without_a_mappable_teacher_trains_on_labels_or_refuses(tmp_path):
    data = write_colour_folder(tmp_path / "colours", 6)
    start = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2,)), tmp_path / "m")
    base = dict(model=str(start), dataset=str(data), epochs=1, batch_size=4, lr=1e-3, workers=0, bench=False)
    final = finetune(TrainConfig(output=str(tmp_path / "a"), **base))
    assert final["head"].startswith("new") and final["loss"].startswith("labels only: no distillation")
    with pytest.raises(evit_cli.EvitError, match="cannot distil: the teacher's 5 classes do not map"):
        finetune(TrainConfig(output=str(tmp_path / "b"), distill=True, **base))
    with pytest.raises(evit_cli.EvitError, match="--head keep"):
        finetune(TrainConfig(output=str(tmp_path / "c"), head="keep", **base))


def test_min_lr_above_the_peak_is_clamped_and_said(tmp_path, flat):
    start = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=7), keep_rate=0.5, layers=(2,)), tmp_path / "m")
    final = finetune(TrainConfig(model=str(start), dataset=str(flat), output=str(tmp_path / "o"), epochs=1,
                                 batch_size=8,
                                 lr=1e-5, min_lr=1e-4, workers=0, bench=False))
    assert any("clamped" in n for n in final["notes"])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert lrs and all(lr == pytest.approx(1e-5) for lr in lrs)  # never above the peak, never rising


def test_finetune_at_img_size_64(tmp_path, flat):
    start = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=7), keep_rate=0.5, layers=(2, 4)),
                          tmp_path / "m")
    out = tmp_path / "big"
    final = finetune(TrainConfig(model=str(start), dataset=str(flat), output=str(out), img_size=64, epochs=1,
                                 batch_size=8, lr=1e-3, workers=0, bench=False))
    assert final["step"] == 36 // 8
    meta = json.loads((out / "evit.json").read_text())
    assert meta["img_size"] == 64 and meta["num_tokens"] == 1 + 16 * 16
    model = evit_cli.load(out)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_sweep_on_an_unlabelled_folder_reports_agreement_per_keep_rate(tmp_path, heldout, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=7), keep_rate=0.7, layers=(2, 4)),
                           tmp_path / "m")
    code, stdout, err = run(["sweep", folder, "--keep-rates", "0.3,1.0", "--dataset", heldout, "--batch", 8, "--reps",
                             1,
                             "--workers", 0, "-o", tmp_path / "sw", "--json"], capsys)
    assert code == 0, err
    rows = {(x["model"], x["keep_rate"]): x for x in json.loads(stdout)["rows"]}
    assert rows[("evit", 1.0)]["agreement"] == 100.0 and rows[("evit", 1.0)]["kl"] == pytest.approx(0.0, abs=1e-9)
    model = evit_cli.convert(evit_cli.load(folder), keep_rate=0.3, layers=(2, 4))
    kl, agree = kl_and_agreement(independent_logits(dense_copy(model), heldout), independent_logits(model, heldout))
    assert (rows[("evit", 0.3)]["kl"] == pytest.approx(kl, rel=1e-4)
            and rows[("evit", 0.3)]["agreement"] == pytest.approx(agree))
    assert "top1" not in rows[("evit", 0.3)] and "agreement (%)" in (tmp_path / "sw" / "sweep.md").read_text()
