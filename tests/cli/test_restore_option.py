"""`evit convert --restore` / ``evit_cli.convert(restore=...)``: how a dense-prediction model puts the removed
patches back is a setting of the converted model, kept in its folder (evit.json and the remote code)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_timm
from test_cli import run
from test_dense import SIZE, dinov2_backbone
from test_remote_code import run_without_evit

import evit_cli
from evit_cli.algorithm.restore import RestoreSpec
from evit_cli.algorithm.state import model_state
from evit_cli.errors import EvitError
from evit_cli.io import folder as artifact

SETTINGS = [("fused", RestoreSpec("fused")), ("reconstruct:0.1", RestoreSpec("reconstruct", 0.1)),
            ("delta:0.05:4", RestoreSpec("delta", 0.05, 4))]
TAPS = [1, 3, 5]


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def timm_maps(model, x):
    with torch.no_grad():
        return model.forward_intermediates(x, indices=TAPS, intermediates_only=True)


def backbone_maps(model, x):
    with torch.no_grad():
        return model(x).feature_maps


def evit_json(folder) -> dict:
    return json.loads((folder / artifact.META_FILE).read_text())["evit"]


@pytest.mark.parametrize("text, spec", SETTINGS)
def test_each_strategy_is_set_saved_and_reloaded_with_the_same_maps(text, spec, x, tmp_path):
    for name, model, maps in (("timm", tiny_timm("vit", num_classes=0), timm_maps),
                              ("dinov2", dinov2_backbone(), backbone_maps)):
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3), restore=text)
        assert model_state(model).config.restore == spec and model_state(model).positions.restore_with == spec
        folder = evit_cli.save(model, tmp_path / name)
        assert evit_json(folder)["restore"] == spec.to_dict()
        back = evit_cli.load(folder)
        assert model_state(back).config.restore == spec, name
        default = evit_cli.convert(evit_cli.load(folder), keep_rate=0.5, layers=(2, 3))  # not set: the default
        for got, want, other in zip(maps(back, x), maps(model, x), maps(default, x)):
            assert torch.equal(got, want), (name, text)
        assert (got - other).abs().max() > 1e-4, (name, text)  # the strategy changed the last map


def test_a_folder_without_the_setting_restores_as_the_default(tmp_path):
    folder = evit_cli.save(evit_cli.convert(dinov2_backbone(), keep_rate=0.5, layers=(2, 3)), tmp_path / "old")
    assert "restore" not in evit_json(folder)  # as folders written before the setting existed
    back = evit_cli.load(folder)
    assert model_state(back).config.restore is None and model_state(back).positions.restore_with == RestoreSpec()


def test_a_strategy_set_by_hand_on_the_position_state_is_saved_too(tmp_path):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2, 4))
    model_state(model).positions.restore_with = RestoreSpec("reconstruct", 0.2)
    back = evit_cli.load(evit_cli.save(model, tmp_path / "m"))
    assert model_state(back).positions.restore_with == RestoreSpec("reconstruct", 0.2)


def test_the_cli_sets_it_and_keeps_a_folders_own(tmp_path, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=0), keep_rate=0.5, layers=(2, 4)),
                           tmp_path / "timm")
    code, out, err = run(["convert", folder, "--restore", "reconstruct:0.1", "-o", tmp_path / "a", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["restore"] == "reconstruct:0.1"
    assert model_state(evit_cli.load(tmp_path / "a")).config.restore == RestoreSpec("reconstruct", 0.1)
    code, _, err = run(["convert", tmp_path / "a", "--keep-rate", "0.6", "-o", tmp_path / "b"], capsys)
    assert code == 0, err
    cfg = model_state(evit_cli.load(tmp_path / "b")).config
    assert cfg.keep_rates == (0.6, 0.6) and cfg.restore == RestoreSpec("reconstruct", 0.1)


def test_the_help_shows_the_default_and_an_example(capsys):
    code, out, _ = run(["convert", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "--restore" in text and "[default: delta:0.05" in text and "reconstruct:0.05" in text


@pytest.mark.parametrize("value, message", [("nearest", "'nearest' is not one of fused, reconstruct, delta"),
                                            ("delta:0", "temperature must be a positive number"),
                                            ("delta:0.05:x", "invalid literal"),
                                            ("delta:0.05:4:1", "at most two numbers")])
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(value, message, tmp_path, capsys):
    code, _, err = run(["convert", "vit_tiny_patch16_224", "--no-pretrained", "--restore", value,
                        "-o", tmp_path / "no"], capsys)
    assert code == 2 and "--restore" in err and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "no").exists()
    with pytest.raises(EvitError, match="is not a restore setting"):
        evit_cli.convert(tiny_timm("vit"), restore=value)


def test_a_transformers_classifier_that_never_restores_is_refused(tmp_path, capsys):
    cfg = tf.ViTConfig(**SIZE, num_labels=3)
    with pytest.raises(EvitError, match="has nothing to put back"):
        evit_cli.convert(tf.ViTForImageClassification(cfg), layers=(2, 3), restore="delta")
    folder = evit_cli.save(evit_cli.convert(tf.ViTForImageClassification(cfg), layers=(2, 3)), tmp_path / "vit")
    code, _, err = run(["convert", folder, "--restore", "fused", "-o", tmp_path / "no"], capsys)
    assert code == 2 and "ViTForImageClassification returns no patch map" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "no").exists()
    # a timm classifier keeps it: its forward_intermediates(output_fmt="NCHW") restores
    model = evit_cli.convert(tiny_timm("vit"), layers=(2, 4), restore="fused")
    assert model_state(model).positions.restore_with == RestoreSpec("fused")


def test_the_remote_code_export_honours_the_setting_without_evit(x, tmp_path):
    backbone = evit_cli.convert(dinov2_backbone(), keep_rate=0.5, layers=(2, 3), restore="fused")
    timm_model = evit_cli.convert(tiny_timm("vit", num_classes=0), keep_rate=0.5, layers=(2, 4),
                                  restore="reconstruct:0.1")
    refs = {"backbone": {"folder": str(evit_cli.save(backbone, tmp_path / "backbone")),
                         "evit": backbone_maps(backbone, x)[-1]},
            "timm": {"folder": str(artifact.save(timm_model, tmp_path / "timm", layout="transformers")),
                     "evit": timm_maps(timm_model, x)[-1]}}
    default = evit_cli.convert(dinov2_backbone(), keep_rate=0.5, layers=(2, 3))
    assert (backbone_maps(default, x)[-1] - refs["backbone"]["evit"]).abs().max() > 1e-4
    torch.save({"x": x, "refs": refs}, tmp_path / "refs.pt")
    out = run_without_evit('''
        import json
        import transformers
        data = torch.load("refs.pt")
        result = {}
        with torch.no_grad():
            model = transformers.AutoModel.from_pretrained(data["refs"]["backbone"]["folder"], trust_remote_code=True)
            got = model.eval()(data["x"]).feature_maps[-1]
            result["backbone"] = (got - data["refs"]["backbone"]["evit"]).abs().max().item()
            model = transformers.AutoModel.from_pretrained(data["refs"]["timm"]["folder"], trust_remote_code=True)
            got = model.eval().timm_model.forward_intermediates(data["x"], indices=[5], intermediates_only=True)[-1]
            result["timm"] = (got - data["refs"]["timm"]["evit"]).abs().max().item()
        print(json.dumps(result))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["backbone"] < 1e-5 and result["timm"] < 1e-5, result


@pytest.fixture(scope="module")
def dense_folders(tmp_path_factory):
    from PIL import Image
    from test_dense import depth_anything

    tmp_path = tmp_path_factory.mktemp("dense")
    Image.new("RGB", (40, 30), (200, 90, 30)).save(tmp_path / "photo.png")
    models = {"backbone": dinov2_backbone(), "depth": depth_anything(), "timm": tiny_timm("vit", num_classes=0)}
    return {name: evit_cli.save(evit_cli.convert(m, keep_rate=0.5, layers=(2, 3), restore="reconstruct"),
                                tmp_path / name) for name, m in models.items()}


def test_visualize_and_bench_take_the_dense_folders(dense_folders, tmp_path, capsys):
    photo, fast = dense_folders["timm"].parent / "photo.png", ["--batch", "2", "--reps", "1", "--warmup", "0", "--json"]
    for name, folder in dense_folders.items():
        code, _, err = run(["visualize", folder, photo, "-o", tmp_path / f"{name}.png"], capsys)
        assert code == 0 and (tmp_path / f"{name}.png").is_file(), (name, err)
        extra = ["--intermediates", "1,3,5"] if name == "timm" else []
        code, out, err = run(["bench", folder, *fast, *extra], capsys)
        assert code == 0, (name, err)
        result = json.loads(out)
        assert result["evit"]["restore"]["strategy"] == "reconstruct"
        if name == "timm":  # forward_intermediates (NCHW: backbone and restore) timed beside the model's forward
            assert result["intermediates"]["indices"] == [1, 3, 5] and result["intermediates"]["speedup"] > 0


@pytest.mark.parametrize("value, message", [("1,9", "out of range: the model has 6 blocks"),
                                            ("1,x", "comma-separated block indices")])
def test_bench_intermediates_out_of_range_is_one_line(dense_folders, value, message, capsys):
    code, _, err = run(["bench", dense_folders["timm"], "--intermediates", value, "--reps", "1"], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0, err


def test_bench_intermediates_on_a_transformers_model_is_one_line(dense_folders, capsys):
    code, _, err = run(["bench", dense_folders["backbone"], "--intermediates", "1", "--reps", "1"], capsys)
    assert code == 2 and "Dinov2Backbone has none" in err and err.strip().count("\n") == 0, err


def test_the_squeeze_method_takes_the_restore_too(x, tmp_path):
    """`--method squeeze` with the default restore: keep 1.0 is the original's maps, a reorganized model gives the
    dense shapes and its folder reloads with the same maps."""
    import copy

    for name, build, maps in (("timm", lambda: tiny_timm("vit", num_classes=0), timm_maps),
                              ("dinov2", dinov2_backbone, backbone_maps)):
        dense = build().eval()
        ref = maps(dense, x)
        same = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3), method="squeeze")
        assert all(torch.equal(a, b) for a, b in zip(maps(same, x), ref)), name
        model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=(2, 3), method="squeeze", restore="delta")
        got = maps(model, x)
        assert [g.shape for g in got] == [r.shape for r in ref], name
        assert (got[-1] - ref[-1]).abs().max() > 1e-4, name  # tokens were removed
        back = evit_cli.load(evit_cli.save(model, tmp_path / name))
        assert model_state(back).config.method == "squeeze", name
        assert all(torch.equal(a, b) for a, b in zip(maps(back, x), got)), name


@pytest.mark.parametrize("method, changed", [("evit", False), ("squeeze", True)])
def test_the_restore_is_told_when_the_kept_tokens_changed(method, changed, x, monkeypatch):
    """Only the squeeze averages tokens into the kept ones: only then does `delta` take that back out."""
    from evit_cli.adapters import block

    seen, step = [], block.restore_step
    monkeypatch.setattr(block, "restore_step", lambda *a: seen.append(a[-1]) or step(*a))
    model = evit_cli.convert(tiny_timm("vit", num_classes=0), keep_rate=0.5, layers=(2, 3), method=method)
    timm_maps(model, x)
    assert seen == [changed, changed]
