"""Dense prediction, more models (issue 32): DPT with its own ViT (depth, segmentation, the hybrid one on BiT),
DPT on a DINOv2 and on a BEiT backbone, DINOv3's and Pixio's backbones. Each at keep 1.0 against the library's
own dense forward, at keep 0.5 against a naive per-image EViT forward and restore (tests/restore_reference.py),
and converted, saved and reloaded with evit_cli.load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf
from conftest import randomize
from restore_reference import naive_restore
from test_dense import SIZE, STAGES, naive_dinov2_states

import evit_cli
from evit_cli import adapters

DPT = dict(SIZE, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16,
           num_labels=3, use_auxiliary_head=True)
BIT = dict(model_type="bit", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64], embedding_size=8,
           num_groups=4, out_features=["stage1", "stage2", "stage3"], global_padding="same",
           embedding_dynamic_padding=True)
HYBRID = dict(DPT, image_size=64, patch_size=16, is_hybrid=True, backbone_config=BIT,
              backbone_featmap_shape=[1, 64, 4, 4], neck_hidden_sizes=[16, 32, 24, 32])


def dpt_depth(seed: int = 0) -> tf.DPTForDepthEstimation:
    torch.manual_seed(seed)
    return randomize(tf.DPTForDepthEstimation(tf.DPTConfig(**DPT)), seed)


BUILD = {  # name -> (builder, image side)
    "dpt_depth": (dpt_depth, 32),
    "dpt_segmentation": (lambda: tf.DPTForSemanticSegmentation(tf.DPTConfig(**DPT)), 32),
    "dpt_hybrid": (lambda: tf.DPTForDepthEstimation(tf.DPTConfig(**HYBRID)), 64),
    "dinov3": (lambda: tf.DINOv3ViTBackbone(tf.DINOv3ViTConfig(**SIZE, num_register_tokens=2, layerscale_value=0.5,
                                                                 out_features=STAGES)), 32),
    "pixio": (lambda: tf.PixioBackbone(tf.PixioConfig(**SIZE, mlp_ratio=2, n_cls_tokens=2, out_features=STAGES)), 32),
}


def build(name: str):
    torch.manual_seed(0)
    builder, side = BUILD[name]
    return randomize(builder()), torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def take(out) -> torch.Tensor:
    """What the user reads: the depth, the logits, or a backbone's feature maps (stacked)."""
    for attr in ("predicted_depth", "logits"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    return torch.stack(out.feature_maps)


# ------------------------------------------------------------------ the naive forward (one image, explicit attention)


def _rotate(t, rope, pos, prefix):
    """RoPE on the patch tokens of ``t`` (H, N, D), each by its original patch's angles; not the fused one (-1)
    nor the prefix."""
    cos, sin = rope
    out = t.clone()
    for r, p in enumerate(pos):
        if p >= 0:
            y = t[:, prefix + r]
            y1, y2 = y.chunk(2, dim=-1)
            out[:, prefix + r] = y * cos[p] + torch.cat([-y2, y1], dim=-1) * sin[p]
    return out


def naive_states(layers, x, prefix, parts, reorg, keep_rate, rows=1, rope=None, strategy="delta", bias=None):
    """The hidden state after each layer, ``x`` (N, C) the embeddings of one image, EViT at 1-based ``reorg``:
    each as [prefix, restored patches] (float64). ``parts(layer)``: (norm1, (q, k, v), out, norm2, mlp), ``out``
    and ``mlp`` with their layer scale; the mean of the first ``rows`` attention rows ranks the patches.
    ``bias(layer)``: the layer's relative position bias (H, N, N) over the full sequence, taken at the tokens'
    original positions (the fused token: none)."""
    stages, states, pos = [], [], list(range(x.shape[0] - prefix))
    for i, layer in enumerate(layers):
        norm1, qkv, out, norm2, mlp = parts(layer)
        n, c = x.shape
        h = layer_heads(layer)
        q, k, v = (p(norm1(x)).reshape(n, h, -1).transpose(0, 1) for p in qkv)
        if rope is not None:
            q, k = _rotate(q, rope, pos, prefix), _rotate(k, rope, pos, prefix)
        logits = q @ k.transpose(1, 2) / math.sqrt(c // h)
        if bias is not None:
            logits = logits + _bias_at(bias(layer), prefix, pos)
        a = torch.softmax(logits, dim=-1)
        x = x + out((a @ v).transpose(0, 1).reshape(n, c))
        if i + 1 in reorg:
            m = n - prefix
            kk = math.ceil(round(keep_rate * m, 6))
            row = a[:, :rows, :].mean((0, 1))[prefix:]
            order = sorted(range(m), key=lambda j: -float(row[j]))
            keep, drop = order[:kk], order[kk:]
            toks = x[prefix:]
            after = torch.cat([toks[keep], sum(row[j] * toks[j] for j in drop)[None]])
            stages.append((toks.clone(), after.clone(), keep))
            x, pos = torch.cat([x[:prefix], after]), [pos[j] for j in keep] + [-1]
        x = x + mlp(norm2(x))
        states.append(torch.cat([x[:prefix].double(), naive_restore(stages, x[prefix:], strategy)]))
    return states


def _bias_at(table, prefix, pos):
    """``table`` (H, N0, N0) at the rows and columns of the tokens [prefix, ``pos``]; 0 for the fused token's."""
    idx = torch.tensor(list(range(prefix)) + [prefix + p if p >= 0 else -1 for p in pos])
    live = (idx >= 0).float()
    at = table[:, idx.clamp(min=0)][:, :, idx.clamp(min=0)]
    return at * live[:, None] * live[None, :]


def layer_heads(layer) -> int:
    cfg = getattr(layer.attention, "config", None) or layer.attention.attention.config
    return cfg.num_attention_heads


def dpt_parts(layer):
    at = layer.attention
    return (layer.layernorm_before, (at.attention.query, at.attention.key, at.attention.value), at.output.dense,
            layer.layernorm_after, lambda h: layer.output.dense(layer.intermediate(h)))


def dinov3_parts(layer):
    at = layer.attention
    return (layer.norm1, (at.q_proj, at.k_proj, at.v_proj), lambda o: layer.layer_scale1(at.o_proj(o)),
            layer.norm2, lambda h: layer.layer_scale2(layer.mlp(h)))


def pixio_parts(layer):
    at = layer.attention
    return layer.layernorm_before, (at.q_proj, at.k_proj, at.v_proj), at.o_proj, layer.layernorm_after, layer.mlp


def naive_output(name: str, model, image, reorg=(2, 3), keep_rate=0.5):
    """What ``model`` gives for one image (batch of 1) with the naive states in its head."""
    if name.startswith("dpt"):
        dpt, cfg = model.dpt, model.config
        emb = dpt.embeddings(image[None])
        states = naive_states(dpt.encoder.layer, emb.last_hidden_states[0], 1, dpt_parts, reorg, keep_rate)
        indices = cfg.backbone_out_indices[2:] if cfg.is_hybrid else cfg.backbone_out_indices
        feats = (list(emb.intermediate_activations) if cfg.is_hybrid else []) + [states[i].float()[None]
                                                                                 for i in indices]
        return model.head(model.neck(feats))
    if name == "dinov3":
        prefix = 1 + model.config.num_register_tokens
        states = naive_states(model.model.layer, model.embeddings(image[None])[0], prefix, dinov3_parts, reorg,
                              keep_rate, rope=model.rope_embeddings(image[None]))
        norm = model.norm
    else:
        prefix = model.config.n_cls_tokens
        states = naive_states(model.pixio.layers, model.pixio.embeddings(image[None])[0], prefix, pixio_parts, reorg,
                              keep_rate, rows=prefix)
        norm = model.layernorm
    side = int(math.isqrt(states[0].shape[0] - prefix))
    return torch.stack([norm(s.float())[prefix:].T.reshape(1, -1, side, side) for s in states])


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", list(BUILD))
def test_keep_1_is_the_original_and_keep_half_equals_the_naive_forward(name):
    dense, x = build(name)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
    with torch.no_grad():
        want = take(dense(x))
        assert torch.equal(take(model(x)), want)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        got = take(model(x))
        assert got.shape == want.shape and not torch.allclose(got, want)
        for b in range(2):
            ref = naive_output(name, model, x[b])
            one = got[b:b + 1] if not name.startswith(("dinov3", "pixio")) else got[:, b:b + 1]
            err = float((one - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, (name, b, err)  # depths of about 100: float32 rounding through the neck


def test_dpt_on_a_dinov2_backbone_follows_the_naive_forward():
    torch.manual_seed(0)
    backbone = tf.Dinov2Config(**SIZE, out_features=STAGES, reshape_hidden_states=False)
    dense = randomize(tf.DPTForDepthEstimation(tf.DPTConfig(
        backbone_config=backbone, hidden_size=48, patch_size=4, image_size=32, neck_hidden_sizes=[8, 16, 24, 32],
        fusion_hidden_size=16, reassemble_hidden_size=48)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
    with torch.no_grad():
        assert torch.equal(model(x).predicted_depth, dense(x).predicted_depth)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        depth, bb = model(x).predicted_depth, model.backbone
        for b in range(2):
            feats = [bb.layernorm(s.float())[None] for s in naive_dinov2_states(bb, x[b], (2, 3), 0.5)]
            want = model.head(model.neck(feats, 8, 8))
            assert float((depth[b] - want[0]).abs().max() / want.abs().max()) < 1e-5


def dpt_beit(seed: int = 0) -> tf.DPTForDepthEstimation:
    """DPT on a BEiT backbone as DPT-BEiT has it: per-layer relative position bias, the stages' hidden states not
    reshaped (the neck reads the class token too)."""
    torch.manual_seed(seed)
    backbone = tf.BeitConfig(**SIZE, out_features=STAGES, use_relative_position_bias=True, reshape_hidden_states=False)
    return randomize(tf.DPTForDepthEstimation(tf.DPTConfig(
        backbone_config=backbone, hidden_size=48, patch_size=4, image_size=32, neck_hidden_sizes=[8, 16, 24, 32],
        fusion_hidden_size=16, reassemble_hidden_size=48)), seed)


def beit_parts(layer):
    at = layer.attention
    return (layer.layernorm_before, (at.q_proj, at.k_proj, at.v_proj), lambda o: layer.lambda_1 * at.o_proj(o),
            layer.layernorm_after, lambda h: layer.lambda_2 * layer.mlp(h))


def test_dpt_on_a_beit_backbone_follows_the_naive_forward():
    dense = dpt_beit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=1.0, layers=(2, 3))
    with torch.no_grad():
        dense_depth = dense(x).predicted_depth
        assert torch.equal(model(x).predicted_depth, dense_depth)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
        depth, beit = model(x).predicted_depth, model.backbone.beit
        assert depth.shape == dense_depth.shape and not torch.allclose(depth, dense_depth)
        for b in range(2):
            emb = beit.embeddings(x[b:b + 1])
            emb = (emb[0] if isinstance(emb, tuple) else emb)[0]
            states = naive_states(beit.layers, emb, 1, beit_parts, (2, 3), 0.5,
                                  bias=lambda layer: layer.relative_position_bias((8, 8), dim_size=emb.shape[0])[0])
            want = model.head(model.neck([s.float()[None] for s in states], 8, 8))
            assert float((depth[b] - want[0]).abs().max() / want.abs().max()) < 1e-5, b


@pytest.mark.parametrize("name", ["dpt_depth", "dpt_segmentation", "dinov3", "pixio"])
def test_converted_models_save_and_reload(name, tmp_path):
    model, x = build(name)
    if name == "pixio":  # transformers 5.25 reloads PixioBackbone's two layer norms swapped, the dense one too
        model.pixio.layernorm.load_state_dict(model.layernorm.state_dict())
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
    back = evit_cli.load(evit_cli.save(model, tmp_path / name))
    assert type(back).__name__ == type(model).__name__
    with torch.no_grad():
        out = adapters.get_adapter(model).outputs(model, x)
        assert torch.equal(adapters.get_adapter(back).outputs(back, x), out)


def test_dense_heads_of_no_supported_family_stay_refused_in_one_line():
    cfg = tf.VitDetConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=4,
                          out_features=["stage2"])
    with pytest.raises(evit_cli.EvitError, match="map of every patch") as e:
        evit_cli.convert(tf.VitDetBackbone(cfg), keep_rate=0.5, layers=(2,))
    assert "\n" not in str(e.value)
