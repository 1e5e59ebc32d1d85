"""Dense prediction (issue 32): the removed patches are put back, so maps keep the dense model's
shapes; each model against the library's own dense forward (keep 1.0) and against the naive
per-image EViT forward and restore of tests/restore_reference.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from conftest import randomize, tiny_timm
from restore_reference import naive_restore, naive_timm_maps

import evit_cli
from evit_cli.algorithm.restore import RestoreSpec
from evit_cli.algorithm.state import model_state

SIZE = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
            patch_size=4)
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def dinov2_backbone(reshape: bool = True, seed: int = 0) -> tf.Dinov2Backbone:
    torch.manual_seed(seed)
    cfg = tf.Dinov2Config(**SIZE, out_features=STAGES, reshape_hidden_states=reshape)
    return randomize(tf.Dinov2Backbone(cfg), seed)


def depth_anything(seed: int = 0) -> tf.DepthAnythingForDepthEstimation:
    torch.manual_seed(seed)
    backbone = tf.Dinov2Config(**SIZE, out_features=STAGES, reshape_hidden_states=False)
    cfg = tf.DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 24, 32],
                                 reassemble_hidden_size=48, head_hidden_size=8, patch_size=4)
    return randomize(tf.DepthAnythingForDepthEstimation(cfg), seed)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ timm forward_intermediates (NCHW)


@pytest.mark.parametrize("strategy", ["fused", "reconstruct", "delta"])
def test_timm_nchw_maps_equal_the_naive_restore(strategy, x):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2, 4))
    model_state(model).positions.restore_with = RestoreSpec(strategy, temperature=0.05)
    taps = [0, 1, 3, 5]
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=taps, intermediates_only=True)
        for b in range(2):
            expected = naive_timm_maps(model, x[b], (2, 4), 0.5, taps, strategy, 0.05)
            for got, want in zip(maps, expected):
                assert got.shape == (2, 48, 8, 8)
                assert torch.allclose(got[b].flatten(1).T.double(), want, atol=1e-4), (strategy, b)


def test_timm_nchw_maps_at_keep_1_are_the_original_and_nlc_is_unchanged(x):
    dense = tiny_timm("vit")
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 4))
    with torch.no_grad():
        for a, b in zip(model.forward_intermediates(x, intermediates_only=True),
                        dense.forward_intermediates(x, intermediates_only=True)):
            assert torch.equal(a, b)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
        nlc = model.forward_intermediates(x, indices=[5], output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (2, 18, 48)  # the tokens that remain: no restore asked for
    assert not model_state(model).positions.restoring


def test_timm_features_only_wrapper_gives_restored_maps_once_its_model_is_converted(x):
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, img_size=32, patch_size=4,
                            embed_dim=48, depth=6, num_heads=3, num_classes=0, out_indices=(1, 3, 5))
    randomize(net)
    with torch.no_grad():
        dense = [f.clone() for f in net(x)]
        evit_cli.convert(net.model, keep_rate=0.7, layers=(3, 5))
        got = net(x)
    assert [f.shape for f in got] == [f.shape for f in dense]
    assert torch.allclose(got[0], dense[0], atol=1e-5)  # block 2, before any EViT block: every patch its own
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()) for a, b in zip(got, dense)]
    assert min(cos) > 0.5  # blocks 4 and 6: the removed patches rebuilt


# ------------------------------------------------------------------ transformers: DINOv2 backbone, Depth Anything


def naive_dinov2_states(backbone, image, layers, keep_rate, strategy="delta", temperature=0.05):
    """The hidden states after each layer of a DINOv2 encoder with EViT, one image, explicit attention,
    each on the full grid as [class token, restored patches] (from the equations)."""
    x = backbone.embeddings(image[None])[0]
    stages, states = [], []
    for i, layer in enumerate(backbone.encoder.layer):
        at = layer.attention
        n, c = x.shape
        h = at.config.num_attention_heads
        d = c // h
        q, k, v = (p(layer.norm1(x)).reshape(n, h, d).transpose(0, 1) for p in (at.q_proj, at.k_proj, at.v_proj))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        x = x + layer.layer_scale1(at.o_proj((a @ v).transpose(0, 1).reshape(n, c)))
        if i + 1 in layers:
            m = n - 1
            kk = math.ceil(round(keep_rate * m, 6))
            row = a[:, 0, :].mean(0)[1:]
            order = sorted(range(m), key=lambda j: -float(row[j]))
            keep, drop = order[:kk], order[kk:]
            toks = x[1:]
            after = torch.cat([toks[keep], sum(row[j] * toks[j] for j in drop)[None]])
            stages.append((toks.clone(), after.clone(), keep))
            x = torch.cat([x[:1], after])
        x = x + layer.layer_scale2(layer.mlp(layer.norm2(x)))
        states.append(torch.cat([x[:1].double(), naive_restore(stages, x[1:], strategy, temperature)]))
    return states


def test_dinov2_backbone_at_keep_1_is_the_original(x):
    dense = dinov2_backbone()
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
    with torch.no_grad():
        for a, b in zip(model(x).feature_maps, dense(x).feature_maps):
            assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["fused", "delta"])
def test_dinov2_backbone_feature_maps_equal_the_naive_forward(strategy, x):
    model = evit_cli.convert(dinov2_backbone(), keep_rate=0.5, layers=(2, 3))
    model_state(model).positions.restore_with = RestoreSpec(strategy)
    with torch.no_grad():
        maps = model(x).feature_maps
        assert [m.shape for m in maps] == [(2, 48, 8, 8)] * 4
        for b in range(2):
            states = naive_dinov2_states(model, x[b], (2, 3), 0.5, strategy)
            for got, state in zip(maps, states):
                want = model.layernorm(state.float())[1:]
                assert torch.allclose(got[b].flatten(1).T, want, atol=1e-4), (strategy, b)


def test_depth_anything_at_keep_1_is_the_original_and_its_depth_follows_the_naive_forward(x):
    dense = depth_anything()
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
    with torch.no_grad():
        assert torch.equal(model(x).predicted_depth, dense(x).predicted_depth)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        depth = model(x).predicted_depth
        assert depth.shape == dense(x).predicted_depth.shape == (2, 32, 32)
        bb = model.backbone
        for b in range(2):
            states = naive_dinov2_states(bb, x[b], (2, 3), 0.5)
            feats = [bb.layernorm(s.float())[None] for s in states]  # reshape_hidden_states=False: (1, N, C)
            want = model.head(model.neck(feats, 8, 8), 8, 8)
            err = float((depth[b] - want[0]).abs().max() / want.abs().max())
            assert err < 1e-5, err  # depths of about 100: float32 rounding through the neck


# ------------------------------------------------------------------ BEiT / Data2Vec segmentation


@pytest.mark.parametrize("cls, cfg_cls", [(tf.BeitForSemanticSegmentation, tf.BeitConfig),
                                          (tf.Data2VecVisionForSemanticSegmentation, tf.Data2VecVisionConfig)])
def test_beit_segmentation_converts_and_keeps_its_logits_shape(cls, cfg_cls, x):
    torch.manual_seed(0)
    cfg = cfg_cls(**SIZE, out_indices=[1, 2, 3, 4], use_relative_position_bias=True, use_auxiliary_head=False,
                  num_labels=3, pool_scales=[1, 2], auxiliary_channels=8, channels=8)
    dense = randomize(cls(cfg))
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
    with torch.no_grad():
        want = dense(x).logits
        assert torch.equal(model(x).logits, want)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        assert model(x).logits.shape == want.shape


def test_beit_backbone_and_upernet_on_it_keep_their_outputs_shapes(x):
    torch.manual_seed(0)
    cfg = tf.BeitConfig(**SIZE, out_features=STAGES, use_relative_position_bias=True)
    backbone = randomize(tf.BeitBackbone(cfg))
    uper = randomize(tf.UperNetForSemanticSegmentation(tf.UperNetConfig(
        backbone_config=cfg, hidden_size=16, auxiliary_in_channels=48, num_labels=3, pool_scales=[1, 2],
        use_auxiliary_head=False)))
    for dense, take in ((backbone, lambda o: o.feature_maps[-1]), (uper, lambda o: o.logits)):
        model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
        with torch.no_grad():
            want = take(dense(x))
            assert torch.equal(take(model(x)), want)
            evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
            got = take(model(x))
        assert got.shape == want.shape and not torch.allclose(got, want)


def test_upernet_on_a_convolutional_backbone_is_refused_in_one_line():
    conv = tf.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=STAGES)
    cfg = tf.UperNetConfig(backbone_config=conv, hidden_size=16, auxiliary_in_channels=24, use_auxiliary_head=False)
    with pytest.raises(evit_cli.EvitError, match="UperNetForSemanticSegmentation is not a Vision Transformer") as e:
        evit_cli.convert(tf.UperNetForSemanticSegmentation(cfg), keep_rate=0.5, layers=(2,))
    assert "\n" not in str(e.value)
