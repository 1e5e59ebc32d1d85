"""The work the commands hand to the library: each function checked against values written out by
hand (the eval report, the search's convert command, an exported folder's summary, loading a model
for a command, and counting the undecodable images of one run)."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from conftest import tiny_timm

import evit_cli
from evit_cli.io import loading
from evit_cli.io.folder import folder_summary
from evit_cli.io.images import BadImages, make_loader, open_image, with_transform
from evit_cli.measure.evaluate import eval_report, validate
from evit_cli.measure.metrics import METRICS, FidelityRow, describe
from evit_cli.measure.report import eval_rows
from evit_cli.measure.search import reproduce_command
from evit_cli.model.convert import dense_copy


def test_eval_report_puts_accuracy_beside_speed():
    accuracy = {"dense": {"images": 10, "top1": 80.0}, "evit": {"images": 10, "top1": 70.0, "agreement": 90.0}}
    speed = {"model": "m", "evit": {"layers": [4]}, "speedup": 1.5, "batch": 8, "device_name": "cpu",
             "dense": {"gmacs": 4.0, "images_per_s": 100.0, "params": 5},
             "evit_model": {"gmacs": 2.5, "images_per_s": 150.0, "params": 5}}
    report = eval_report(accuracy, speed, dataset="photos", labelled=True, training={"epochs": 1},
                         reference="reference: the dense model it started from")
    assert report == {
        "model": "m", "dataset": "photos", "images": 10, "evit": {"layers": [4]}, "labelled": True,
        "training": {"epochs": 1}, "reference": "reference: the dense model it started from",
        "dense": {"images": 10, "top1": 80.0, "gmacs": 4.0, "images_per_s": 100.0},
        "evit_model": {"images": 10, "top1": 70.0, "agreement": 90.0, "gmacs": 2.5, "images_per_s": 150.0},
        "speedup": 1.5, "batch": 8, "device_name": "cpu",
    }


def test_the_measures_are_declared_once_and_the_rows_carry_them():
    from dataclasses import fields

    assert {m.key for m in METRICS} <= {f.name for f in fields(FidelityRow)}
    row = FidelityRow.from_dict("evit", {"images": 10, "agreement": 90.0, "kl": 0.01234, "top1": 70.0, "top5": 95.0,
                                         "val_loss": 0.5, "split": "ignored"})
    assert row.to_dict() == {"images": 10, "agreement": 90.0, "kl": 0.01234, "top1": 70.0, "top5": 95.0,
                             "val_loss": 0.5}
    assert list(row.metrics()) == ["agreement", "kl", "top1", "top5"]  # the table columns, in the declared order
    assert describe(row) == "agreement with the teacher 90.00%, KL 0.0123; top-1 70.00%, top-5 95.00%, val loss 0.5000"
    epoch = {**row.to_dict(), "keep_rate": [0.7, 0.5], "split": "split 'val'"}
    assert describe(epoch, "the dense model").endswith("; keep 0.700,0.500 (10 images: split 'val')")
    report = {"batch": 8, "dense": {"top1": 80.0, "gmacs": 4.0, "images_per_s": None},
              "evit_model": {**row.to_dict(), "gmacs": 2.5, "images_per_s": None}}
    assert eval_rows(report) == [["model", "agreement (%)", "KL(dense‖EViT)", "top-1 (%)", "top-5 (%)", "GMACs"],
                                 ["dense", "-", "-", "80.00", "-", "4.00"],
                                 ["EViT", "90.00", "0.0123", "70.00", "95.00", "2.50"]]


def test_validate_measures_a_model_against_its_reference_as_written_out():
    model = evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.3, layers=(2, 4))
    dense = dense_copy(model).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])
    with torch.no_grad():
        e, d = model.eval()(x), dense(x)
    p = d.softmax(-1)
    labelled = y >= 0
    row = validate(model, dense, [(x[:6], y[:6]), (x[6:], y[6:])], "cpu")
    assert row.images == 10 and row.labelled_images == 8
    assert row.agreement == pytest.approx(100 * (e.argmax(-1) == d.argmax(-1)).double().mean().item())
    assert row.kl == pytest.approx((p * (p.log() - e.log_softmax(-1))).sum(-1).mean().item(), rel=1e-4)
    assert row.top1 == pytest.approx(100 * (e.argmax(-1) == y)[labelled].double().mean().item())

    class Teacher:  # a distillation teacher: outputs over the model's classes
        def outputs(self, images):
            return dense(images)

    assert validate(model, Teacher(), [(x, y)], "cpu").agreement == pytest.approx(row.agreement)
    alone = validate(model, None, [(x, y)], torch.device("cpu"))
    assert alone.agreement is None and alone.kl is None and alone.top1 == pytest.approx(row.top1)


def test_evaluate_in_one_call_without_timing(tmp_path):
    from test_train import write_colour_folder

    data = write_colour_folder(tmp_path / "colours", 3)
    model = evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.5, layers=(2,))
    result = evit_cli.evaluate(model, data, bench=False, batch=4, workers=0, limit=7)
    assert result.images == 7 and result.labelled and result.evit_model.agreement is not None
    r = result.to_dict()
    assert r["images"] == 7 and r["speedup"] is None and r["evit_model"]["images_per_s"] is None
    assert r["evit_model"]["gmacs"] < r["dense"]["gmacs"] and r["dataset"] == str(data)
    assert r["evit_model"]["top1"] == result.evit_model.top1 and "agreement" not in r["dense"]


def test_reproduce_command_names_what_was_found_and_quotes_paths():
    found = {"keep_rates": [0.9, 0.55], "layers": [3, 6], "fuse": False}
    command = reproduce_command("my models/vit", found, pretrained=False, checkpoint="w 1.pth")
    assert command == ("evit convert 'my models/vit' --keep-rate 0.9,0.55 --layers 3,6 --no-pretrained "
                       "--checkpoint 'w 1.pth' --no-fuse")
    assert shlex.split(command)[2] == "my models/vit"
    single = {"keep_rate": 0.7, "layers": [4, 7, 10], "fuse": True}
    assert reproduce_command("deit_small_patch16_224", single) == (
        "evit convert deit_small_patch16_224 --keep-rate 0.7 --layers 4,7,10")


def test_folder_summary_reads_the_folder_and_the_reports_written_into_it(tmp_path):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 4)), tmp_path / "m")
    (folder / "metrics.json").write_text(json.dumps({"top1": 50.0, "kl": 0.1, "lr": 1e-4}))
    (folder / "bench.json").write_text(json.dumps({"speedup": 1.4, "batch": 4, "device_name": "cpu", "x": 1}))
    s = folder_summary(folder)
    patches = 64  # 32 px images, 4 px patches
    after_2 = math.ceil(0.7 * patches) + 2  # kept patches, the class token and the fused token
    after_4 = math.ceil(0.7 * (after_2 - 1)) + 2
    assert s["tokens"] == [patches + 1, after_2, after_4] == [65, 47, 35]
    assert (s["layers"], s["keep_rates"], s["fuse"], s["num_classes"], s["img_size"]) == ([2, 4], [0.7, 0.7], True,
                                                                                           10, 32)
    assert s["folder"] == str(folder) and s["family"]
    assert s["metrics"] == {"top1": 50.0, "kl": 0.1}
    assert s["bench"] == {"speedup": 1.4, "batch": 4, "device": "cpu"}


def test_folder_summary_without_reports_has_neither(tmp_path):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(3,)), tmp_path / "m")
    s = folder_summary(folder)
    assert "metrics" not in s and "bench" not in s and s["keep_rates"] == [0.5]


def test_pretrained_flag_is_refused_for_an_exported_folder(tmp_path):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 4)), tmp_path / "m")
    assert loading.is_exported(folder) and not loading.is_exported(tmp_path)
    assert loading.pretrained_flag(folder, None) is True
    for value, flag in ((True, "--pretrained"), (False, "--no-pretrained")):
        with pytest.raises(evit_cli.EvitError, match=f"drop {flag},"):
            loading.pretrained_flag(folder, value)
    assert loading.pretrained_flag("vit_tiny_patch16_224", None) is True
    assert loading.pretrained_flag("vit_tiny_patch16_224", False) is False


def test_load_converted_keeps_a_folders_settings_unless_given(tmp_path):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 4), fuse=False),
                           tmp_path / "m")
    own = loading.load_converted(folder)
    assert evit_cli.model_state(own).config == evit_cli.EViTConfig((2, 4), (0.7, 0.7), False)
    given = loading.load_converted(folder, "0.5", "3")
    assert evit_cli.model_state(given).config == evit_cli.EViTConfig((3,), (0.5,), False)
    named = loading.load_converted("deit_tiny_patch16_224", pretrained=False)
    assert evit_cli.model_state(named).config == evit_cli.EViTConfig((4, 7, 10), (0.7, 0.7, 0.7), True)
    assert loading.source_name(named, "x") == "deit_tiny_patch16_224"
    assert loading.source_name(torch.nn.Linear(1, 1), "given") == "given"


@pytest.fixture
def photos(tmp_path):
    """Six files: four small PNGs and two that are not images."""
    from PIL import Image

    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        if i in (1, 4):
            p.write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(p)
        paths.append(str(p))
    return paths


def test_bad_images_stop_a_run_unless_it_skips_them(photos):
    with pytest.raises(evit_cli.EvitError, match=r"cannot read image .*1\.png"):
        open_image(photos[1])
    with pytest.raises(evit_cli.EvitError, match="--skip-bad-images"):
        open_image(photos[1], BadImages())
    bad = BadImages(skip=True)
    assert open_image(photos[1], bad) is None and open_image(photos[0], bad).size == (8, 8)
    assert bad.count == 1 and BadImages(skip=True).count == 0  # each run counts its own


@pytest.mark.parametrize("workers", [0, 2])
def test_a_runs_count_includes_its_dataloader_workers(photos, workers):
    import datasets
    from torchvision.transforms import ToTensor

    ds = datasets.Dataset.from_dict({"image": photos})
    bad = BadImages(skip=True)
    loaded = with_transform(ds, "image", None, ToTensor(), bad=bad)
    images = torch.cat([x for x, _ in make_loader(loaded, batch_size=2, workers=workers)])
    assert images.shape == (4, 3, 8, 8) and bad.count == 2
    other = BadImages(skip=True)  # a second run starts from zero
    list(make_loader(with_transform(ds, "image", None, ToTensor(), bad=other), batch_size=3, workers=0))
    assert other.count == 2 and bad.count == 2
