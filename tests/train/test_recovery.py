"""Label-free recovery by function matching: the mixed batch, the distillation terms, headless models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_timm
from PIL import Image

import evit_cli
from evit_cli.errors import EvitError
from evit_cli.train import TrainConfig, distill, finetune
from evit_cli.train.loader import mix_batch, mixed_target


def _batch(n=4, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_mixup_is_a_convex_mix_with_the_reversed_batch():
    x = _batch()
    torch.manual_seed(3)
    mixed, lam, perm = mix_batch(x, mixup=1.0, cutmix=0.0)
    assert perm.tolist() == [3, 2, 1, 0] and 0 < lam < 1
    for i in range(4):
        torch.testing.assert_close(mixed[i], lam * x[i] + (1 - lam) * x[3 - i])


def test_cutmix_pastes_one_box_and_lam_is_the_share_of_own_pixels():
    x = _batch()
    torch.manual_seed(5)
    mixed, lam, _ = mix_batch(x, mixup=0.0, cutmix=1.0)
    own = (mixed[0] == x[0]).all(0)  # pixels of image 0 left as they were (image 3 differs everywhere)
    other = (mixed[0] == x[3]).all(0)
    assert (own | other).all()
    assert own.float().mean().item() == pytest.approx(lam)
    rows, cols = torch.nonzero(other, as_tuple=True)
    if rows.numel():  # the pasted pixels form one rectangle
        box = other[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()


def test_both_on_choose_one_per_batch_about_half_the_time():
    x = _batch()
    torch.manual_seed(0)
    kinds = []
    for _ in range(200):
        mixed, _, _ = mix_batch(x, mixup=1.0, cutmix=1.0)
        kinds.append(bool(((mixed == x) | (mixed == x.flip(0))).all()))  # cutmix keeps every pixel of one image
    assert 70 < sum(kinds) < 130


def test_mixed_target_mixes_smoothed_one_hots():
    t = torch.tensor([0, 2, 1])
    soft = mixed_target(t, 3, 0.25, torch.tensor([2, 1, 0]), smoothing=0.3)
    hot = lambda c: torch.tensor([0.1 + 0.7 * (k == c) for k in range(3)])  # noqa: E731
    torch.testing.assert_close(soft[0], 0.25 * hot(0) + 0.75 * hot(1))
    torch.testing.assert_close(soft.sum(1), torch.ones(3))


@pytest.mark.parametrize("kind", ["mse", "kl", "cosine"])
def test_distillation_term_is_zero_when_student_is_teacher_and_positive_otherwise(kind):
    t = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    assert distill.distill_term(t.clone(), t, kind).item() == pytest.approx(0.0, abs=1e-6)
    assert distill.distill_term(t + 0.5 * torch.randn_like(t), t, kind).item() > 1e-3


def test_terms_against_their_formulas():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    mse = sum(((s[i] - t[i]) ** 2).sum() for i in range(3)) / 30
    assert distill.distill_term(s, t, "mse").item() == pytest.approx(mse.item(), rel=1e-5)
    cos = sum(float(s[i] @ t[i] / (s[i].norm() * t[i].norm())) for i in range(3)) / 3
    assert distill.distill_term(s, t, "cosine").item() == pytest.approx(1 - cos + mse.item() / float((t ** 2).mean()),
                                                                        rel=1e-5)
    p = F.softmax(t, -1)
    kl = float((p * (p.log() - F.log_softmax(s, -1))).sum() / 3)
    assert distill.distill_term(s, t, "kl").item() == pytest.approx(kl, rel=1e-5)


def test_auto_term_follows_what_the_model_outputs():
    assert distill.distill_kind("auto", embedding=False) == "mse"
    assert distill.distill_kind("auto", embedding=True) == "cosine"
    assert distill.distill_kind("kl", embedding=False) == "kl"
    with pytest.raises(EvitError, match="needs class logits"):
        distill.distill_kind("kl", embedding=True)


# --------------------------------------------------------------------------- through finetune


def _flat_folder(root, n=40, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 255, 3)
        img = np.clip(rng.normal(0, 50, (32, 32, 3)) + base, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
    return root


def _config(model, data, out, **kw):
    values = dict(model=str(model), dataset=str(data), output=str(out), epochs=1, batch_size=8, lr=1e-3,
                  workers=0, bench=False, seed=0)
    values.update(kw)
    return TrainConfig(**values)


def test_teacher_and_student_see_the_same_mixed_batch(tmp_path, monkeypatch):
    model = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2, 4)),
                          tmp_path / "m")
    data = _flat_folder(tmp_path / "photos", 24)
    seen = {"student": [], "teacher": []}
    real_outputs = distill.Teacher.outputs

    def teacher_outputs(self, images):
        seen["teacher"].append(images.clone())
        return real_outputs(self, images)

    import evit_cli.train.loop as train

    real_mixed = train.mixed

    def mixed(cfg, s, images, target):
        out = real_mixed(cfg, s, images, target)
        if s.model.training:
            seen["student"].append((images.clone(), out[0].clone()))
        return out

    monkeypatch.setattr(distill.Teacher, "outputs", teacher_outputs)
    monkeypatch.setattr(train, "mixed", mixed)
    finetune(_config(model, data, tmp_path / "run"))
    assert seen["student"]
    for (raw, mix), t in zip(seen["student"], seen["teacher"]):
        assert torch.equal(mix, t)  # the teacher's input is the student's mixed batch
        assert not torch.equal(mix, raw)  # and it was mixed


def _headless(tmp_path):
    model = evit_cli.convert(tiny_timm("vit", num_classes=0, seed=1), keep_rate=0.25, layers=(1, 2))
    return tiny_timm("vit", num_classes=0, seed=1), evit_cli.save(model, tmp_path / "headless")


def _cosine(a, b, images):
    with torch.no_grad():
        return F.cosine_similarity(a.eval()(images), b.eval()(images), dim=-1).mean().item()


def _images(folder):
    from timm.data import create_transform

    tf = create_transform(input_size=(3, 32, 32), is_training=False, crop_pct=1.0)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())])


def test_headless_model_recovers_its_embedding_without_labels(tmp_path):
    dense, folder = _headless(tmp_path)
    data = _flat_folder(tmp_path / "photos", 48)
    images = _images(data)
    before = _cosine(evit_cli.load(folder), dense, images)
    out = tmp_path / "run"
    final = finetune(_config(folder, data, out, epochs=3, lr=1e-4))
    after = _cosine(evit_cli.load(out), dense, images)
    assert "cosine" in final and math.isfinite(final["cosine"])
    assert after > before + 0.002, (before, after)  # measured: 0.9844 -> 0.9879
    record = json.loads((out / "evit.json").read_text())["training"]
    assert record["distillation"]["loss"] == "cosine" and "cosine" in record["loss"]


def test_headless_model_with_kl_is_one_line(tmp_path):
    _, folder = _headless(tmp_path)
    data = _flat_folder(tmp_path / "photos", 16)
    with pytest.raises(EvitError, match="--distill-loss kl needs class logits"):
        finetune(_config(folder, data, tmp_path / "run", distill_loss="kl"))


def _labelled_folder(root, per_class=12):
    """Two classes (red-ish and blue-ish images), a subfolder each."""
    rng = np.random.default_rng(0)
    for name, base in (("reds", (200, 40, 40)), ("blues", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(0, 40, (32, 32, 3)) + base, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_headless_model_with_labels_stays_headless_and_scores_knn(tmp_path):
    dense, folder = _headless(tmp_path)
    data = _labelled_folder(tmp_path / "photos")
    out = tmp_path / "run"
    final = finetune(_config(folder, data, out, epochs=2, lr=1e-4))
    model = evit_cli.load(out)
    assert model.num_classes == 0 and model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dense.num_features)
    assert "knn_top1" in final and final["labelled_images"] > 0  # the labels score the embedding
    record = json.loads((out / "evit.json").read_text())["training"]
    assert record["head"].startswith("none: the model is headless")
    assert record["distillation"]["loss"] == "cosine" and record["distillation"]["alpha"] == 1.0


def test_headless_model_with_labels_and_a_new_head_trains_a_classifier(tmp_path):
    _, folder = _headless(tmp_path)
    data = _labelled_folder(tmp_path / "photos")
    finetune(_config(folder, data, tmp_path / "run", head="new"))
    assert evit_cli.load(tmp_path / "run").num_classes == 2


def test_headless_model_with_labels_and_no_distill_is_one_line(tmp_path):
    _, folder = _headless(tmp_path)
    data = _labelled_folder(tmp_path / "photos")
    with pytest.raises(EvitError, match="headless .* --no-distill leaves nothing to train on"):
        finetune(_config(folder, data, tmp_path / "run", distill=False))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("convert", [False, True])
def test_feature_term_is_the_mse_of_the_pre_logits_features(convert):
    """inner_outputs collects what timm's own forward_head(pre_logits=True) returns, for both models."""
    dense = tiny_timm("vit", num_classes=5, seed=2).eval()
    student = tiny_timm("vit", num_classes=5, seed=2).eval()
    if convert:
        student = evit_cli.convert(student, keep_rate=0.5, layers=(2,))
    teacher = distill.Teacher(dense, None, "the dense model before conversion", "mse", features=2.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), distill.inner_outputs(student, teacher) as got:
        student(x), teacher.outputs(x)
        term = distill.inner_term(got, teacher)
        ref = {k: m.forward_head(m.forward_features(x), pre_logits=True) for k, m in (("s", student), ("t", dense))}
    assert torch.allclose(term, 2.0 * F.mse_loss(ref["s"], ref["t"]), atol=1e-6)
    assert (term.item() > 1e-6) == convert  # zero when the student is the teacher
    assert not student.get_classifier()._forward_pre_hooks  # the hooks are gone


def test_default_recovery_records_its_feature_term_and_a_headless_one_has_none(tmp_path):
    model = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2, 4)),
                          tmp_path / "m")
    data = _flat_folder(tmp_path / "photos", 16)
    finetune(_config(model, data, tmp_path / "run"))
    record = json.loads((tmp_path / "run" / "evit.json").read_text())["training"]
    assert record["distillation"]["features"] == 1.0 and "pre-logits features" in record["loss"]
    _, headless = _headless(tmp_path)
    finetune(_config(headless, data, tmp_path / "run2"))
    assert json.loads((tmp_path / "run2" / "evit.json").read_text())["training"]["distillation"]["features"] == 0


def _tiny_hf_vit(seed):
    import transformers as tf
    from conftest import randomize

    cfg = tf.ViTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=96)
    return randomize(tf.ViTModel(cfg, add_pooling_layer=False), seed)


def _class_tokens(model, x):
    """The class token after each layer but the last, from the library's own forward."""
    if hasattr(model, "forward_intermediates"):  # timm
        _, mid = model.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=False)
        return [prefix for _, prefix in mid[:-1]]
    return [h[:, :1] for h in model(pixel_values=x, output_hidden_states=True).hidden_states[1:-1]]


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_layer_term_is_the_relative_mse_of_the_class_tokens_after_each_layer(library):
    """inner_outputs collects the class token after every layer but the last as the library's own forward
    returns it (timm's forward_intermediates, transformers' hidden_states), for both models."""
    make = (lambda seed: tiny_timm("vit", num_classes=0, seed=seed)) if library == "timm" else _tiny_hf_vit
    dense, student = make(2), make(3)
    teacher = distill.Teacher(dense, None, "the dense model before conversion", "cosine", layers=2.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        s, t = _class_tokens(student, x), _class_tokens(dense, x)
    hooks = sum(len(m._forward_hooks) for m in student.modules())  # transformers keeps its own
    with torch.no_grad(), distill.inner_outputs(student, teacher) as got:
        student(x), teacher.outputs(x)
        term = distill.inner_term(got, teacher)
    ref = 2.0 * sum(F.mse_loss(a, b) / b.pow(2).mean() for a, b in zip(s, t)) / len(t)
    assert len(got["student"]) == len(t) and torch.allclose(term, ref, rtol=1e-5)
    assert sum(len(m._forward_hooks) for m in student.modules()) == hooks  # ours are gone


def test_layer_term_follows_the_class_token_through_evit_layers():
    dense = tiny_timm("vit", num_classes=0, seed=2)
    student = evit_cli.convert(tiny_timm("vit", num_classes=0, seed=2), keep_rate=0.5, layers=(2, 4))
    teacher = distill.Teacher(dense, None, "the dense model before conversion", "cosine", layers=1.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), distill.inner_outputs(student, teacher) as got:
        student(x), teacher.outputs(x)
        term = distill.inner_term(got, teacher)
    assert all(torch.equal(got["student"][i], got["teacher"][i]) for i in (0, 1))  # before the first EViT layer
    assert term.item() > 1e-6  # the class token changes once tokens are fused


def test_layer_term_and_four_epochs_by_default_for_embedding_models_only(tmp_path):
    data = _flat_folder(tmp_path / "photos", 16)
    _, headless = _headless(tmp_path)
    finetune(_config(headless, data, tmp_path / "run", epochs=None))
    record = json.loads((tmp_path / "run" / "evit.json").read_text())["training"]
    assert record["distillation"]["layers"] == 1.0 and "class token after every layer" in record["loss"]
    assert record["epochs"] == 4 and len({json.loads(x)["epoch"] for x in (tmp_path / "run" / "train_log.jsonl")
                                         .read_text().splitlines()}) == 4  # an embedding model's default
    finetune(_config(headless, data, tmp_path / "run0", distill_layers=0))
    assert json.loads((tmp_path / "run0" / "evit.json").read_text())["training"]["distillation"]["layers"] == 0
    model = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=5), keep_rate=0.5, layers=(2,)), tmp_path / "m")
    finetune(_config(model, data, tmp_path / "run2", epochs=None))
    record = json.loads((tmp_path / "run2" / "evit.json").read_text())["training"]
    assert record["distillation"]["layers"] == 0 and record["epochs"] == 2  # a classifier's defaults


@pytest.mark.parametrize("repo", ["openai__clip-vit-base-patch16", "facebook__dinov2-small"])
def test_transformers_embedding_tower_recovers_with_the_layer_term(repo, tmp_path):
    """A real hub folder (CLIP: its image tower, image_embeds; DINOv2: the pooled output), two layers of
    random weights, converted and recovered on a flat folder: the layer term is on, behind the EViT layer."""
    from test_transformers_hub import HUB, _shrunk

    folder = _shrunk(HUB / repo, tmp_path / repo)
    start = evit_cli.save(evit_cli.convert(evit_cli.load_model(folder, pretrained=False), keep_rate=0.5, layers=(1,)),
                          tmp_path / "start")
    data = _flat_folder(tmp_path / "photos", 9)
    final = finetune(_config(start, data, tmp_path / "run", batch_size=4, lr=1e-5))
    record = json.loads((tmp_path / "run" / "evit.json").read_text())["training"]
    assert record["distillation"]["layers"] == 1.0 and "class token after every layer" in record["loss"]
    assert math.isfinite(final["cosine"]) and 0 < final["cosine"] <= 1 + 1e-6
