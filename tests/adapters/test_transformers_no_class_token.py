"""transformers towers without a class token (SigLIP, I-JEPA, AIMv2) and the class-token towers whose
layer layout got a spec with them (AltCLIP, GIT, CLIPSeg, BLIP-2, InstructBLIP, TIPSv2), on tiny random
models of transformers' own classes: keep 1.0 is the original model exactly; below it the outputs keep
their shapes and the predicted token counts; SigLIP's pooling heads are checked against transformers'
own head on the sequence where each token is repeated as many times as the patches it holds, and a
reorganized SigLIP tower against a loop over transformers' own layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from conftest import randomize

import evit_cli
from evit_cli.adapters import evit_blocks, get_adapter

SIZE = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
            intermediate_size=96)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=16)
LAYERS, RATES = (2, 3), (0.5, 0.6)

BUILDERS = {
    "siglip_vision": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**SIZE)),
    "siglip_vision_no_head": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**SIZE, vision_use_head=False)),
    "siglip": lambda: tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=SIZE)),
    "siglip_classifier": lambda: tf.SiglipForImageClassification(tf.SiglipConfig(
        text_config=TEXT, vision_config=SIZE, num_labels=5)),
    "ijepa": lambda: tf.IJepaModel(tf.IJepaConfig(**SIZE)),
    "ijepa_classifier": lambda: tf.IJepaForImageClassification(tf.IJepaConfig(**SIZE, num_labels=5)),
    "aimv2_vision": lambda: tf.Aimv2VisionModel(tf.Aimv2VisionConfig(**SIZE, use_head=True)),
    "altclip_vision": lambda: tf.AltCLIPVisionModel(tf.AltCLIPVisionConfig(**SIZE)),
    "git_vision": lambda: tf.GitVisionModel(tf.GitVisionConfig(**SIZE)),
    "clipseg_vision": lambda: tf.CLIPSegVisionModel(tf.CLIPSegVisionConfig(**SIZE)),
    "blip2_vision": lambda: tf.Blip2VisionModel(tf.Blip2VisionConfig(**SIZE)),
    "instructblip_vision": lambda: tf.InstructBlipVisionModel(tf.InstructBlipVisionConfig(**SIZE)),
    "tipsv2_vision": lambda: tf.Tipsv2VisionModel(tf.Tipsv2VisionConfig(**SIZE, num_register_tokens=1)),
}
NO_CLASS_TOKEN = {"siglip_vision", "siglip_vision_no_head", "siglip", "siglip_classifier", "ijepa",
                  "ijepa_classifier", "aimv2_vision"}


def build(name: str):
    torch.manual_seed(0)
    return randomize(BUILDERS[name]())


def output(model, x):
    return get_adapter(model).outputs(model, x)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keep_1_is_the_original_and_reorganized_shapes_follow_the_prediction(name, images):
    model = build(name)
    with torch.no_grad():
        dense = output(model, images)
        for score in get_adapter(model).scores(model):
            evit = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=LAYERS, score=score)
            assert torch.equal(output(evit, images), dense), score
            evit_cli.convert(evit, keep_rate=RATES, layers=LAYERS, score=score)
            seen = []
            hooks = [b.register_forward_hook(lambda m, i, o: seen.append(
                (o[0] if isinstance(o, tuple) else o).shape[1])) for b in evit_blocks(evit)]
            out = output(evit, images)
            for h in hooks:
                h.remove()
            assert out.shape == dense.shape and torch.isfinite(out).all(), score
            assert seen == evit_cli.tokens_after_layers(evit), score
    assert ("cls" in get_adapter(model).scores(model)) == (name not in NO_CLASS_TOKEN)


def _sizes_on(model, sizes):
    """Make the converted ``model`` believe its tokens hold ``sizes`` (B, N) patches."""
    positions = evit_blocks(model)[0].evit.positions
    positions.sizes = sizes


@pytest.mark.parametrize("name", ["siglip_vision", "aimv2_vision"])
def test_attention_pool_sees_a_token_as_the_patches_it_holds(name):
    model = build(name)
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=0.5, layers=LAYERS)
    x = torch.randn(2, 5, 48)
    sizes = torch.tensor([[1.0, 3, 2, 1, 4], [2.0, 1, 1, 5, 1]])
    _sizes_on(evit, sizes)
    with torch.no_grad():
        got = evit.head(x)
        want = torch.stack([model.head(x[b].repeat_interleave(sizes[b].long(), 0)[None])[0] for b in range(2)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mean_pooled_classifier_weighs_each_token_by_its_patches():
    model = build("siglip_classifier")
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=0.5, layers=LAYERS)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = evit(images).logits
        hidden = evit.vision_model(images).last_hidden_state
        sizes = evit_blocks(evit)[0].evit.positions.sizes
        want = torch.stack([model.classifier(hidden[b].repeat_interleave(sizes[b].long(), 0).mean(0))
                            for b in range(2)])
    assert sizes.sum(1).tolist() == [64.0, 64.0]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def _mean_query_row(layer, h, sizes):
    """The mean query's attention row over ``h`` (N, C), averaged over heads, one head at a time."""
    attn = layer.self_attn
    n, c = h.shape
    heads, d = attn.num_heads, attn.head_dim
    q, k = attn.q_proj(h).reshape(n, heads, d), attn.k_proj(h).reshape(n, heads, d)
    w = sizes / sizes.sum()
    rows = [torch.softmax((w[:, None] * q[:, i]).sum(0) @ k[:, i].T / math.sqrt(d), -1) for i in range(heads)]
    return sum(rows) / heads


def _received_row(layer, h, sizes):
    """The attention each token receives, averaged over every query and head, one head at a time."""
    attn = layer.self_attn
    n, c = h.shape
    heads, d = attn.num_heads, attn.head_dim
    q, k = attn.q_proj(h).reshape(n, heads, d), attn.k_proj(h).reshape(n, heads, d)
    return sum(torch.softmax(q[:, i] @ k[:, i].T / math.sqrt(d), -1).mean(0) for i in range(heads)) / heads


@pytest.mark.parametrize("score", ["mean_query", "received"])
def test_reorganized_siglip_tower_equals_a_loop_over_its_own_layers(images, score):
    """keep and fuse by the score's row, the fused token the weighted mean, then transformers' own head on the
    sequence where each token is repeated by the patches it holds."""
    model = build("siglip_vision")
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS, score=score)
    vm = getattr(model, "vision_model", model)
    with torch.no_grad():
        got = evit(images).pooler_output
        want = []
        for img in images:
            x, sizes, _ = naive_layers(vm, vm.embeddings(img[None])[0], score)
            want.append(vm.head(vm.post_layernorm(x).repeat_interleave(sizes.long(), 0)[None])[0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-4)


def test_class_score_is_refused_for_a_tower_without_a_class_token():
    with pytest.raises(evit_cli.EvitError, match="no class token"):
        evit_cli.convert(build("siglip_vision"), layers=LAYERS, score="cls")


def _probe_row(vm, x, sizes):
    """The pooling head's probe query over the keys it would compute from ``x`` (N, C) (``post_layernorm``, then
    the key projection of its ``nn.MultiheadAttention``), ``log`` of the sizes added, averaged over heads: by hand,
    from the head's weights, one head at a time."""
    mha = vm.head.attention
    n, c = x.shape
    heads = mha.num_heads
    d = c // heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = (vm.head.probe.reshape(c) @ w[:c].T + b[:c]).reshape(heads, d)
    k = (vm.post_layernorm(x) @ w[c:2 * c].T + b[c:2 * c]).reshape(n, heads, d)
    return sum(torch.softmax(k[:, i] @ q[i] / math.sqrt(d) + sizes.log(), -1) for i in range(heads)) / heads


ROWS = {"received": _received_row, "mean_query": _mean_query_row}


def naive_layers(vm, x, score: str, rates: dict | None = None):
    """A SigLIP-style tower's layers on one image's tokens ``x`` (N, C), by hand over its own modules: at each EViT
    layer (1-based, ``rates``, default LAYERS at RATES; after the attention residual) the ``ceil(rate * N)`` best
    tokens by the score's row (the probe's from the head's weights, the others from the layer's) are kept and the
    rest fused into their mean weighted by that row. Returns the tokens, the patches each holds, and after each
    EViT layer the patch each token stands for (-1: a fused token)."""
    rates = rates or dict(zip(LAYERS, RATES))
    sizes, ids, after = torch.ones(x.shape[0]), list(range(x.shape[0])), {}
    for i, layer in enumerate(vm.encoder.layers, start=1):
        if i not in rates:
            x = layer(x[None], None)[0]
            continue
        h = layer.layer_norm1(x)
        x = x + layer.self_attn(h[None], None)[0][0]
        row = _probe_row(vm, x, sizes) if score == "probe" else ROWS[score](layer, h, sizes)
        k = math.ceil(round(rates[i] * x.shape[0], 6))
        if k < x.shape[0]:
            order = sorted(range(x.shape[0]), key=lambda j: -float(row[j]))
            keep, drop = order[:k], order[k:]
            fused = sum(row[j] * x[j] for j in drop) / sum(row[j] for j in drop)
            x, sizes = torch.cat([x[keep], fused[None]]), torch.cat([sizes[keep], sizes[drop].sum()[None]])
            ids = [ids[j] for j in keep] + [-1]
        after[i] = ids
        x = x + layer.mlp(layer.layer_norm2(x))
    return x, sizes, after


def test_probe_score_ranks_by_the_heads_own_query(images):
    """score="probe" on SigLIP's MAP-pooled tower: at each EViT layer (after the attention residual) the kept tokens
    are the top of the probe's attention over the keys, computed by hand from the head's weights, and the fused token
    is their mean weighted by that row; the pooled output equals that loop over transformers' own layers."""
    model = build("siglip_vision")
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS, score="probe")
    vm = getattr(model, "vision_model", model)
    with torch.no_grad():
        got = evit(images).pooler_output
        kept = {i: evit_blocks(evit)[0].evit.positions.after[i - 1][:, :-1] for i in LAYERS}  # patch ids, fused last
        want = []
        for b, img in enumerate(images):
            x, sizes, ids = naive_layers(vm, vm.embeddings(img[None])[0], "probe")
            for i in LAYERS:
                assert sorted(kept[i][b].tolist()) == sorted(ids[i][:-1]), i
            want.append(vm.head(vm.post_layernorm(x).repeat_interleave(sizes.long(), 0)[None])[0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-4, rtol=1e-4)


def test_siglip2_text_tower_is_refused_with_its_reason():
    cfg = tf.Siglip2TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                               vocab_size=99)
    with pytest.raises(evit_cli.EvitError, match="text tower") as err:
        evit_cli.convert(tf.Siglip2TextModel(cfg), layers=(1,))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["siglip_vision", "siglip", "ijepa_classifier"])
def test_a_saved_tower_converts_on_the_command_line(name, tmp_path, capsys, images):
    from test_cli import run

    model = build(name)
    model.save_pretrained(tmp_path / "hf")
    code, _, err = run(["convert", tmp_path / "hf", "-k", "0.5", "-l", "2,3", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    loaded = evit_cli.load(tmp_path / "out")
    assert evit_cli.model_state(loaded).config.score == "received"
    want = evit_cli.convert(copy.deepcopy(model), keep_rate=0.5, layers=LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, images), output(want, images))
