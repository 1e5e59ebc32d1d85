"""The adapter layer itself: the model's output per family, one spec per converted model, ranking before dropout."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import timm
import torch
import transformers as tf
from conftest import randomize
from timm.models.vision_transformer import VisionTransformer

import evit_cli
from evit_cli import adapters
from evit_cli.adapters.timm import families as timm_families
from evit_cli.io.export import _Logits
from evit_cli.measure.fidelity import outputs

SIZE = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3)
TIMM = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------- the model's output, per family


def _clip_projection():
    torch.manual_seed(0)
    cfg = tf.CLIPVisionConfig(**SIZE, intermediate_size=96, projection_dim=16)
    return randomize(tf.CLIPVisionModelWithProjection(cfg))


def test_eval_and_export_take_the_same_output_of_a_clip_tower(x):
    """A CLIP tower with its projection: eval measures and export emits its ``image_embeds``."""
    model = evit_cli.convert(_clip_projection(), keep_rate=0.5, layers=(2,))
    with torch.no_grad():
        expected = model(x).image_embeds
        measured, exported = outputs(model, x), _Logits(model).eval()(x)
    assert measured.shape == (2, 16) and (measured - expected).abs().max() < 1e-6
    assert (exported - expected).abs().max() < 1e-6


def _hf(name: str):
    torch.manual_seed(0)
    build = {
        "clip_model": lambda: tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=99, max_position_embeddings=16),
            vision_config=dict(SIZE, intermediate_size=96), projection_dim=16)),
        "clip_vision": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**SIZE, intermediate_size=96)),
        "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**SIZE, mlp_ratio=2)),
        "vit_pooler": lambda: tf.ViTModel(tf.ViTConfig(**SIZE, intermediate_size=96)),
        "vit_no_pooler": lambda: tf.ViTModel(tf.ViTConfig(**SIZE, intermediate_size=96), add_pooling_layer=False),
        "vit_classifier": lambda: tf.ViTForImageClassification(tf.ViTConfig(**SIZE, intermediate_size=96,
                                                                            num_labels=5)),
    }[name]
    return randomize(build())


def _library_output(name: str, model, x):
    """What the library's users take, read from transformers' own forward (the dense model)."""
    if name == "clip_model":
        return model.get_image_features(pixel_values=x).pooler_output  # the projected image embedding
    out = model(pixel_values=x)
    if name == "vit_no_pooler":
        return out.last_hidden_state[:, 0]
    return out.logits if name == "vit_classifier" else out.pooler_output


@pytest.mark.parametrize("name",
                         ["clip_model", "clip_vision", "dinov2", "vit_pooler", "vit_no_pooler", "vit_classifier"])
def test_the_output_of_each_transformers_family_is_what_its_users_take(name, x):
    model = _hf(name)
    with torch.no_grad():
        expected = _library_output(name, model, x)
        evit_cli.convert(model, keep_rate=1.0, layers=(2,))
        adapter = adapters.get_adapter(model)
        assert (adapter.outputs(model, x) - expected).abs().max() < 1e-5
        assert (_Logits(model)(x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("num_classes", [0, 7])
def test_the_output_of_a_timm_model_is_its_logits_or_pre_logits_features(num_classes, x):
    model = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM, num_classes=num_classes))
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = model.forward_head(feats, pre_logits=num_classes == 0)
        evit_cli.convert(model, keep_rate=1.0, layers=(2,))
        got = adapters.get_adapter(model).outputs(model, x)
    assert got.shape == (2, 48 if num_classes == 0 else 7) and (got - expected).abs().max() < 1e-5


# ----------------------------------------------------------------- one block class, several families


def test_a_block_class_shared_by_two_families_runs_each_familys_spec(monkeypatch, x):
    """timm's ``Block`` serves several model specs (ViT, NaFlexViT, CrossViT): converting a model of one
    must not decide the spec the blocks of the next model run with."""

    class TaggedViT(VisionTransformer):
        pass

    calls = []

    def tagged_terms(blk, *args, **kwargs):
        calls.append(blk)
        return timm_families.vit_terms(blk, *args, **kwargs)

    tagged = replace(timm_families.FAMILIES[0], name="tagged", model=TaggedViT, terms=tagged_terms)
    monkeypatch.setattr(timm_families, "FAMILIES", (tagged, *timm_families.FAMILIES))
    torch.manual_seed(0)
    with torch.no_grad():
        evit_cli.convert(randomize(VisionTransformer(**TIMM)), keep_rate=0.5, layers=(2,))(x)
        assert not calls
        evit_cli.convert(randomize(TaggedViT(**TIMM)), keep_rate=0.5, layers=(2,))(x)
    assert len(calls) == 1  # the tagged model's own spec ran its EViT block


def test_a_crossvit_converted_after_a_vit_runs_the_crossvit_spec():
    """The real case of the test above: ``Block`` in a ViT, then in a CrossViT; each model's blocks carry
    its own spec, and the CrossViT keeps the token counts of each of its branches."""
    from test_families_timm import tiny_crossvit

    evit_cli.convert(randomize(VisionTransformer(**TIMM)), keep_rate=0.5, layers=(2,))
    model = evit_cli.convert(tiny_crossvit(), keep_rate=0.5, layers=(2,))
    assert {b.evit.family.name for b in adapters.all_evit_blocks(model)} == {"CrossViT"}
    seen = []
    for blk in adapters.all_evit_blocks(model):
        blk.register_forward_hook(lambda m, a, o: seen.append((a[0].shape[1], o.shape[1])))
    with torch.no_grad():
        model(torch.randn(2, 3, *model.img_size))
    assert [(n, 1 + math.ceil(0.5 * (n - 1)) + 1) for n, _ in seen] == seen and len(seen) == 2


# ----------------------------------------------------------------- ranking before attention dropout


def _dropout_model(family: str, attn: str):
    torch.manual_seed(0)
    if family == "vit":
        cfg = tf.ViTConfig(**SIZE, intermediate_size=96, attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0,
                           attn_implementation=attn)
        model = tf.ViTModel(cfg, add_pooling_layer=False)
    else:
        cfg = tf.Data2VecVisionConfig(**SIZE, intermediate_size=96, attention_probs_dropout_prob=0.5,
                                      hidden_dropout_prob=0.0, use_relative_position_bias=True,
                                      attn_implementation=attn)
        model = tf.Data2VecVisionModel(cfg)
    return randomize(model)


def _kept_at_first_layer(model, x, train: bool, seed: int = 0):
    adapters.record_kept(model)
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        model(x)
    return adapters.evit_blocks(model)[0].evit.kept.sort(dim=1).values


@pytest.mark.parametrize("family", ["vit", "data2vec"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_dropout_does_not_change_which_tokens_are_kept(family, attn, x):
    """The tokens are ranked by the attention before dropout: training with attention dropout keeps the
    tokens evaluation keeps (the first block reads the embeddings, so nothing random comes before it)."""
    model = evit_cli.convert(_dropout_model(family, attn), keep_rate=0.5, layers=(1,))
    expected = _kept_at_first_layer(copy.deepcopy(model), x, train=False)
    for seed in range(3):
        assert torch.equal(_kept_at_first_layer(model, x, train=True, seed=seed), expected)


# ----------------------------------------------------------------- one support check per conversion


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_convert_checks_support_once(kind, monkeypatch):
    if kind == "timm":
        model = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM))
    else:
        model = _hf("vit_classifier")
    adapter = adapters.get_adapter(model)
    calls = []
    check = type(adapter).check
    monkeypatch.setattr(type(adapter), "check", lambda self, m: (calls.append(m), check(self, m))[1])
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
    assert calls == [model]
