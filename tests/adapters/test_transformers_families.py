"""Every supported transformers family, on tiny random models, against transformers' own forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from conftest import randomize

import evit_cli
from evit_cli.adapters import record_kept

SIZE = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=6, num_attention_heads=3)
VIT = dict(SIZE, intermediate_size=96, layer_norm_eps=1e-6)
CLIP_VISION = dict(SIZE, intermediate_size=96, projection_dim=16)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                 max_position_embeddings=16)
BEIT = dict(VIT, layer_scale_init_value=0.1, use_mean_pooling=True, num_labels=5)


def _build(name: str, attn: str):
    """(model, prefix tokens) of family ``name``, random weights."""
    kw = dict(attn_implementation=attn)
    builders = {
        "vit": lambda: (tf.ViTForImageClassification(tf.ViTConfig(**VIT, num_labels=5, **kw)), 1),
        "deit_teacher": lambda: (tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**VIT, num_labels=5, **kw)), 2),
        "vit_msn": lambda: (tf.ViTMSNForImageClassification(tf.ViTMSNConfig(**VIT, num_labels=5, **kw)), 1),
        "vit_mae": lambda: (tf.ViTMAEModel(tf.ViTMAEConfig(**VIT, mask_ratio=0.75, **kw)), 1),
        "dinov2": lambda: (tf.Dinov2Model(tf.Dinov2Config(**SIZE, mlp_ratio=2, layerscale_value=0.5, **kw)), 1),
        "dinov2_cls": lambda: (tf.Dinov2ForImageClassification(tf.Dinov2Config(
            **SIZE, mlp_ratio=2, num_labels=5, **kw)), 1),
        "dinov2_reg": lambda: (tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            **SIZE, mlp_ratio=2, num_register_tokens=4, **kw)), 5),
        "dinov2_reg_cls": lambda: (tf.Dinov2WithRegistersForImageClassification(tf.Dinov2WithRegistersConfig(
            **SIZE, mlp_ratio=2, num_register_tokens=4, num_labels=5, **kw)), 5),
        "clip_vision": lambda: (tf.CLIPVisionModel(tf.CLIPVisionConfig(**CLIP_VISION, **kw)), 1),
        "clip_projection": lambda: (tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**CLIP_VISION, **kw)), 1),
        "clip": lambda: (tf.CLIPModel(tf.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16,
                                                    **kw)), 1),
        "beit": lambda: (tf.BeitForImageClassification(tf.BeitConfig(
            **BEIT, use_relative_position_bias=True, **kw)), 1),
        "beit_shared": lambda: (tf.BeitModel(tf.BeitConfig(**BEIT, use_shared_relative_position_bias=True, **kw)), 1),
        "data2vec": lambda: (tf.Data2VecVisionForImageClassification(tf.Data2VecVisionConfig(
            **BEIT, use_relative_position_bias=True, **kw)), 1),
        "data2vec_shared": lambda: (tf.Data2VecVisionModel(tf.Data2VecVisionConfig(
            **BEIT, use_shared_relative_position_bias=True, **kw)), 1),
        "dpt": lambda: (tf.DPTModel(tf.DPTConfig(**VIT, **kw)), 1),  # DPT's own ViT: ViT's older nested layout
    }
    torch.manual_seed(0)
    model, prefix = builders[name]()
    return randomize(model), prefix


FAMILIES = ["vit", "deit_teacher", "vit_msn", "vit_mae", "dinov2", "dinov2_cls", "dinov2_reg", "dinov2_reg_cls",
            "clip_vision", "clip_projection", "clip", "beit", "beit_shared", "data2vec", "data2vec_shared", "dpt"]
RELPOS = ("beit", "data2vec")  # relative position bias: per-layer tables ("beit", "data2vec") or a shared one


def _out(model, x, original_mae=False):
    """The tensor a user takes from the model: logits, else the image embedding (CLIP), else the class token."""
    if isinstance(model, tf.CLIPModel):
        return model.get_image_features(pixel_values=x).pooler_output
    if original_mae:  # transformers' own ViT-MAE with masking off: ratio 0, patches in image order
        noise = torch.arange(64.0).expand(x.shape[0], -1)
        return model(x, noise=noise).last_hidden_state
    out = model(x)
    for attr in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, attr, None) is not None:
            return out[attr]
    return out.last_hidden_state


def _original(model):
    dense = copy.deepcopy(model)
    if isinstance(dense, tf.ViTMAEModel):
        dense.config.mask_ratio = 0.0
    return dense


def _layers(model):
    root = getattr(model, "vision_model", None) or model.base_model
    return root.encoder.layers if hasattr(root, "encoder") and hasattr(root.encoder, "layers") else (
        root.encoder.layer if hasattr(root, "encoder") else root.layers)


@pytest.mark.parametrize("method", ["evit", "squeeze"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_rate_1_is_the_original_model(name, attn, method, images):
    model, _ = _build(name, attn)
    dense = _original(model)
    mae = isinstance(model, tf.ViTMAEModel)
    with torch.no_grad():
        expected = _out(dense, images, original_mae=mae)
        evit_cli.convert(model, keep_rate=1.0, layers=(2, 4, 5), method=method)
        assert (_out(model, images) - expected).abs().max() < 1e-5
        evit_cli.revert(model)
        assert not any(type(m).__name__.startswith("EViT") for m in model.modules())
        assert (_out(model, images) - expected).abs().max() < 1e-5


def _independent_counts(n: int, prefix: int, rates) -> list[int]:
    counts = []
    for r in rates:
        m = n - prefix
        n = prefix + math.ceil(r * m - 1e-9) + 1
        counts.append(n)
    return counts


def _projections(attn_mod):
    """The (query, key) linear layers of the attention module, in either transformers layout."""
    inner = getattr(attn_mod, "attention", None)  # the older nested layout (Data2Vec-vision)
    return (inner.query, inner.key) if inner is not None else (attn_mod.q_proj, attn_mod.k_proj)


def _cls_row_naive(attn_mod, h, bias, spec_scale, heads):
    """Mean over heads of the class token's softmax row, one head at a time, from the module's own projections."""
    b, n, _ = h.shape
    d = h.shape[-1] // heads
    wq, wk = _projections(attn_mod)
    q, k = wq(h).view(b, n, heads, d), wk(h).view(b, n, heads, d)
    rows = []
    for hd in range(heads):
        logits = torch.einsum("bd,bnd->bn", q[:, 0, hd], k[:, :, hd])
        logits = logits * spec_scale + (bias[:, hd, 0] if bias is not None else 0)
        rows.append(logits.softmax(-1))
    return torch.stack(rows).mean(0)


def _naive_bias(dense_model, positions, n0):
    """(B, H, N, N) bias at ``positions`` (original indices; n0 = the fused token: zero), one entry at a time."""
    root = dense_model.base_model
    table = getattr(root, "shared_position_bias", None) or root.encoder.relative_position_bias
    full = table((8, 8), False, dim_size=n0)[0]
    b, n = positions.shape
    out = torch.zeros(b, full.shape[0], n, n)
    for i in range(b):
        for r in range(n):
            for c in range(n):
                pr, pc = int(positions[i, r]), int(positions[i, c])
                if pr < n0 and pc < n0:
                    out[i, :, r, c] = full[:, pr, pc]
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_rate_half_keeps_what_the_original_layer_computes(name, images):
    model, prefix = _build(name, "sdpa")
    dense = _original(model)
    layers_1b, rates = (2, 4, 5), (0.5, 0.5, 0.5)
    evit_cli.convert(model, keep_rate=0.5, layers=layers_1b)
    record_kept(model)
    seen = {}
    hooks = [_layers(model)[i - 1].register_forward_hook(
        lambda mod, args, kwargs, out, i=i: seen.__setitem__(
            i, (args[0], kwargs, out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True)
        for i in layers_1b]
    with torch.no_grad():
        _out(model, images)
    for h in hooks:
        h.remove()
    counts = _independent_counts(64 + prefix, prefix, rates)
    assert evit_cli.tokens_after_layers(model) == counts
    assert [seen[i][2].shape[1] for i in layers_1b] == counts
    relpos, per_layer = name.startswith(RELPOS), name in RELPOS
    positions = None
    for j, i in enumerate(layers_1b):
        inp, kwargs, out = seen[i]
        layer, ref_layer = _layers(model)[i - 1], _layers(dense)[i - 1]
        kept = layer.evit.kept
        kw = {k: v for k, v in kwargs.items() if k in ("resolution", "interpolate_pos_encoding")}
        bias = None
        if relpos:
            if per_layer and j > 0:
                break  # a per-layer table: checked at its first EViT layer (the shared table covers the gather)
            if positions is None:
                positions = torch.arange(65).expand(inp.shape[0], -1)
            if per_layer:
                table = (getattr(ref_layer, "relative_position_bias", None)
                         or ref_layer.attention.attention.relative_position_bias)
                bias = table((8, 8), False, dim_size=65).expand(inp.shape[0], -1, -1, -1)
            else:
                bias = _naive_bias(dense, positions, 65)
        with torch.no_grad():
            ref = _reference_layer(name, ref_layer, inp, None if per_layer else bias, kw)
            ref_attn = getattr(ref_layer, "attention", None) or ref_layer.self_attn
            norm1 = (getattr(ref_layer, "layernorm_before", None) or getattr(ref_layer, "norm1", None)
                     or ref_layer.layer_norm1)
            heads = SIZE["num_attention_heads"]
            scale = (getattr(ref_attn, "scaling", None) or getattr(ref_attn, "scale", None)
                     or (SIZE["hidden_size"] // heads) ** -0.5)  # the older layout divides by sqrt(head_dim)
            row = _cls_row_naive(ref_attn, norm1(inp), bias, scale, heads)[:, prefix:]
        k = kept.shape[1]
        assert torch.equal(kept.sort(1).values, row.topk(k, dim=1).indices.sort(1).values)
        idx = kept.unsqueeze(-1).expand(-1, -1, ref.shape[-1])
        assert (out[:, :prefix] - ref[:, :prefix]).abs().max() < 1e-5
        assert (out[:, prefix:prefix + k] - ref[:, prefix:].gather(1, idx)).abs().max() < 1e-5
        if positions is not None:
            positions = torch.cat([positions[:, :prefix], positions[:, prefix:].gather(1, kept),
                                   torch.full((positions.shape[0], 1), 65)], 1)


def _reference_layer(name, layer, inp, shared_bias, kw):
    """transformers' own layer on ``inp``, given the shared bias the model would pass it (None: none)."""
    if name.startswith("data2vec"):  # the older layout: the shared bias as an argument, a tuple back
        return layer(inp, relative_position_bias=shared_bias, **kw)[0]
    if name == "dpt":  # its layer takes no mask
        return layer(inp, **kw)
    return layer(inp, attention_mask=shared_bias, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_squeeze_runs_in_every_family_with_no_extra_token(name, images):
    """Eager and sdpa attention agree (the size bias goes through both); prefix + kept tokens, no fused one."""
    outs = []
    for attn in ("eager", "sdpa"):
        model, prefix = _build(name, attn)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4), method="squeeze")
        with torch.no_grad():
            outs.append(_out(model, images))
        assert evit_cli.tokens_after_layers(model) == [prefix + 32, prefix + 16]
    assert outs[0].shape == outs[1].shape and (outs[0] - outs[1]).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["vit", "dinov2_reg_cls", "clip", "beit", "data2vec"])
def test_forward_and_backward_run(name, images):
    model, _ = _build(name, "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    model.train()
    _out(model, images).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters()
             if ("q_proj" in n or "attention.query" in n) and ("vision" in n or "text" not in n)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["vit", "data2vec"])  # attentions recorded by hooks / returned by the older layers
def test_output_attentions_and_hidden_states_follow_the_tokens(name, images):
    model, _ = _build(name, "eager")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    with torch.no_grad():
        out = model(images, output_attentions=True, output_hidden_states=True)
    counts = [65, 65, 34, 34, 19, 19, 19]  # entering block 1, then after each of the 6 blocks
    assert [h.shape[1] for h in out.hidden_states] == counts
    assert len(out.attentions) == 6  # one map per layer, over the tokens entering that layer
    assert [a.shape[-1] for a in out.attentions] == counts[:-1]
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in out.attentions)


def test_a_user_attention_mask_is_refused(images):
    model, _ = _build("vit", "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2,))
    with pytest.raises(evit_cli.EvitError, match="takes no attention_mask"):
        model.vit(images, attention_mask=torch.ones(3, 65))


def test_vit_mae_masking_is_off_and_every_patch_in_order(images):
    model, _ = _build("vit_mae", "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2,))
    with torch.no_grad():
        out = model(images)
    assert model.config.mask_ratio == 0.0
    assert torch.equal(out.ids_restore, torch.arange(64).expand(3, -1)) and not out.mask.any()


@pytest.mark.parametrize("cls, cfg, match", [
    (tf.ViTForMaskedImageModeling, tf.ViTConfig(**VIT), "masked-image-modeling"),
    (tf.DeiTForMaskedImageModeling, tf.DeiTConfig(**VIT), "masked-image-modeling"),
    (tf.Siglip2TextModel, tf.Siglip2TextConfig(hidden_size=48, num_hidden_layers=6, num_attention_heads=3,
                                               intermediate_size=96), "text tower reads text"),
    (tf.TimesformerModel, tf.TimesformerConfig(**VIT),
     "TimesformerModel is a ViT with a class token, but .* not supported yet"),
    (tf.VitDetBackbone, tf.VitDetConfig(**SIZE), "VitDetBackbone predicts from a map of every patch"),
    (tf.ConvNextModel, tf.ConvNextConfig(), "ConvNextModel is not a Vision Transformer family"),
])
def test_other_transformers_models_are_refused_truthfully(cls, cfg, match):
    with pytest.raises(evit_cli.EvitError, match=match) as e:
        evit_cli.convert(cls(cfg), keep_rate=0.5, layers=(2,))
    assert "\n" not in str(e.value) and "lacks a class token" not in str(e.value)


@pytest.mark.parametrize("headless", [False, True])
def test_timm_wrapper_goes_through_the_timm_adapter(headless, images):
    from reference import reference_forward

    cfg = tf.TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=5,
                               model_args=dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3))
    torch.manual_seed(0)
    model = randomize((tf.TimmWrapperModel if headless else tf.TimmWrapperForImageClassification)(cfg))
    timm_model = copy.deepcopy(model.timm_model)
    with torch.no_grad():
        evit_cli.convert(model, keep_rate=1.0, layers=(2, 4))
        out = model(images)
        dense = (timm_model(images) if not headless
                 else timm_model.forward_head(timm_model.forward_features(images), pre_logits=True))
        assert ((out.pooler_output if headless else out.logits) - dense).abs().max() < 1e-5
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
        assert evit_cli.tokens_after_layers(model) == _independent_counts(65, 1, (0.5, 0.5))
        if not headless:  # the independent, naive EViT forward of tests/reference.py on the same timm weights
            expected, counts = reference_forward(timm_model, images, (2, 4), (0.5, 0.5))
            assert counts == [34, 19] and (model(images).logits - expected).abs().max() < 1e-4
        else:
            assert model(images).last_hidden_state.shape == (3, 19, 48)
    evit_cli.revert(model)
    assert type(model.timm_model.blocks[1]).__name__ == "Block"
