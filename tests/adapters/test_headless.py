"""`--num-classes 0`: a headless (embedding) timm model from a classifier checkpoint, its head's
weights dropped, in `convert`, `finetune` and the library; exported folders load back headless."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, tiny_timm
from safetensors.torch import save_file
from test_cli import run
from test_train import write_colour_folder

import evit_cli

ARGS = {k: v for k, v in TINY.items() if k != "num_classes"}


def save_weights(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def pre_logits(classifier, x):
    """The classifier's embedding as timm computes it: the features before its head."""
    with torch.no_grad():
        return classifier.forward_head(classifier.forward_features(x), pre_logits=True)


def hub_folder(root, model, name="vit_tiny_patch16_224"):
    """A folder in timm's hub layout (config.json + model.safetensors) holding a tiny classifier."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architecture": name, "num_classes": TINY["num_classes"],
                                                  "model_args": ARGS}))
    save_weights(model, root / "model.safetensors")
    return root


@pytest.mark.parametrize("kind, name", [("vit", "vit_tiny_patch16_224"),
                                        ("distilled", "deit_tiny_distilled_patch16_224")])
def test_library_drops_the_head_of_a_classifier_checkpoint(kind, name, tmp_path):
    classifier = tiny_timm(kind)
    weights = save_weights(classifier, tmp_path / "w.safetensors")
    model = evit_cli.load_model(name, checkpoint=weights, num_classes=0, **ARGS)
    assert not any(k.startswith("head") for k in model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), pre_logits(classifier, x), atol=1e-6)
    converted = evit_cli.convert(model, keep_rate=1.0, layers=(2, 4))
    assert evit_cli.adapters.get_adapter(converted).num_classes(converted) == 0


def test_convert_by_name_with_a_checkpoint_exports_a_headless_folder(tmp_path, capsys):
    """The issue's command, on a (random) DeiT-Tiny classifier checkpoint."""
    import timm

    torch.manual_seed(0)
    classifier = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    weights = save_weights(classifier, tmp_path / "deit.safetensors")
    out = tmp_path / "headless"
    code, stdout, err = run(["convert", "deit_tiny_patch16_224", "--checkpoint", weights, "--num-classes", 0,
                             "--keep-rate", 1.0, "-o", out, "--json"], capsys)
    assert code == 0, err
    assert err == "" or "head" not in err  # nothing said about a head half-loaded
    meta = json.loads((out / "evit.json").read_text())
    assert meta["num_classes"] == 0
    loaded = evit_cli.load(out)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pre_logits(classifier, x), atol=1e-5)  # keep 1.0: the dense embedding
    assert evit_cli.adapters.get_adapter(loaded).num_classes(loaded) == 0


def test_convert_a_hub_layout_folder_headless_and_eval_it(tmp_path, capsys):
    classifier = tiny_timm("vit")
    folder = hub_folder(tmp_path / "tiny", classifier)
    out = tmp_path / "out"
    code, _, err = run(["convert", folder, "--num-classes", 0, "-k", 0.5, "-l", "2,4", "-o", out], capsys)
    assert code == 0, err
    loaded = evit_cli.load(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(evit_cli.dense_copy(loaded)(x), pre_logits(classifier, x), atol=1e-6)
    photos = write_colour_folder(tmp_path / "colours", 2)
    code, stdout, err = run(["eval", out, "--dataset", photos, "--reps", 1, "--workers", 0, "--json"], capsys)
    assert code == 0, err
    assert {"cosine", "neighbour_overlap", "knn_top1"} <= set(json.loads(stdout)["evit_model"])


def test_finetune_takes_num_classes_zero(tmp_path, capsys):
    """A headless model from the classifier's folder; with labels it stays headless (the labels score kNN)."""
    folder = hub_folder(tmp_path / "tiny", tiny_timm("vit"))
    photos = write_colour_folder(tmp_path / "colours", 4)
    out = tmp_path / "ft"
    code, stdout, err = run(["finetune", folder, "--dataset", photos, "--num-classes", 0, "-o", out, "-l", "2,4",
                             "--epochs", 1,
                             "--batch-size", 6, "--workers", 0, "--no-bench", "--json"], capsys)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["num_classes"] == 0
    result = json.loads(stdout)
    assert result["head"].startswith("none: the model is headless") and "knn_top1" in result
    assert evit_cli.load(out).num_classes == 0


@pytest.mark.parametrize("argv, words", [
    (["finetune", "M", "--dataset", "D", "--num-classes", -1, "-o", "o"], "--num-classes must be 0 or more"),
    (["convert", "M", "--num-classes", 0, "-o", "o"], "--num-classes 0 (headless) is for timm models"),
])
def test_bad_num_classes_is_one_line(argv, words, tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    hf = tmp_path / "hf"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=6,
                                         num_attention_heads=3, intermediate_size=96, num_labels=4)).save_pretrained(hf)
    capsys.readouterr()  # what save_pretrained printed
    argv = [{"M": hf, "D": tmp_path, "o": tmp_path / "o"}.get(a, a) if isinstance(a, str) else a for a in argv]
    code, stdout, err = run(argv, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
