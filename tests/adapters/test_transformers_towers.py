"""The transformers towers added after the first families: CLIP-like towers (MetaCLIP 2, Chinese-CLIP,
OWL-ViT, OWLv2), BLIP (fused qkv), Pixio (several class tokens), DINOv3 (RoPE, registers), MLCD (RoPE
with a class-token rotation) and YOLOS (detection tokens last, per-layer position embeddings).

Every check compares with transformers' own modules or a naive computation written here: the
dense model, the original layers run one image at a time with naively gathered rotations, a class
row computed head by head, token counts and positions followed by hand.
"""

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
V = dict(SIZE, intermediate_size=96)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=16)
YOLOS = dict(V, image_size=[32, 32], num_detection_tokens=5)

# name -> (builder(attn), class tokens first, tokens kept last)
BUILD = {
    "metaclip2": (lambda kw: tf.MetaClip2VisionModelWithProjection(tf.MetaClip2VisionConfig(
        **V, projection_dim=16, **kw)), 1, 0),
    "chinese_clip": (lambda kw: tf.ChineseCLIPVisionModel(tf.ChineseCLIPVisionConfig(**V, **kw)), 1, 0),
    "chinese_clip_full": (lambda kw: tf.ChineseCLIPModel(tf.ChineseCLIPConfig(
        vision_config=V, text_config=dict(TEXT, max_position_embeddings=32), projection_dim=16, **kw)), 1, 0),
    "owlvit": (lambda kw: tf.OwlViTVisionModel(tf.OwlViTVisionConfig(**V, **kw)), 1, 0),
    "owlv2": (lambda kw: tf.Owlv2VisionModel(tf.Owlv2VisionConfig(**V, **kw)), 1, 0),
    "blip": (lambda kw: tf.BlipVisionModel(tf.BlipVisionConfig(**V, attn_implementation="eager")), 1, 0),
    "pixio": (lambda kw: tf.PixioModel(tf.PixioConfig(**SIZE, mlp_ratio=2, n_cls_tokens=4, **kw)), 4, 0),
    "dinov3": (lambda kw: tf.DINOv3ViTModel(tf.DINOv3ViTConfig(
        **V, num_register_tokens=4, layerscale_value=0.5, **kw)), 5, 0),
    "mlcd": (lambda kw: tf.MLCDVisionModel(tf.MLCDVisionConfig(**V, **kw)), 1, 0),
    "yolos": (lambda kw: tf.YolosModel(tf.YolosConfig(**YOLOS, use_mid_position_embeddings=False, **kw)), 1, 5),
    "yolos_det": (lambda kw: tf.YolosForObjectDetection(tf.YolosConfig(**YOLOS, use_mid_position_embeddings=True,
                                                                       num_labels=3, **kw)), 1, 5),
}
NAMES = list(BUILD)
ROPE = {"dinov3": 0, "mlcd": 1}  # RoPE families: how many prefix tokens have a rotation of their own


def _build(name: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    builder, prefix, suffix = BUILD[name]
    return randomize(builder(dict(attn_implementation=attn))), prefix, suffix


def _out(model, x):
    """What a user takes: logits, the image embedding, the pooled output."""
    if hasattr(model, "text_model"):
        return model.get_image_features(pixel_values=x).pooler_output
    out = model(x)
    for attr in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, attr, None) is not None:
            return out[attr]
    return out.last_hidden_state


def _layers(model):
    root = getattr(model, "vision_model", None) or model.base_model
    for holder in (root, getattr(root, "encoder", None)):
        for attr in ("layers", "layer"):
            if holder is not None and isinstance(getattr(holder, attr, None), torch.nn.ModuleList):
                return getattr(holder, attr)
    raise AssertionError("no layers")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_keep_rate_1_is_the_original_model_and_revert_restores_it(name, attn, images):
    model, _, _ = _build(name, attn)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        expected = _out(dense, images)
        evit_cli.convert(model, keep_rate=1.0, layers=(2, 4, 5))
        assert (_out(model, images) - expected).abs().max() < 1e-5
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4, 5))
        assert (_out(model, images) - expected).abs().max() > 1e-4  # tokens were really removed
        evit_cli.revert(model)
        assert not any(type(m).__name__.startswith("EViT") for m in model.modules())
        assert not any(h for m in model.modules() for h in m._forward_hooks.values())
        assert torch.equal(_out(model, images), expected)


def _counts(n: int, keep_always: int, rates) -> list[int]:
    counts = []
    for r in rates:
        n = keep_always + math.ceil(r * (n - keep_always) - 1e-9) + 1
        counts.append(n)
    return counts


# --------------------------------------------------------------------------- naive references


def _half_turn(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-x2, x1], -1)


def _naive_rope(cos, sin, rows: int, pos):
    """(cos, sin) of one image for its tokens: the prefix rows, then each patch's row, identity for a fused one."""
    if pos is None:
        return cos, sin
    d = cos.shape[-1]
    out_c, out_s = [cos[:rows]], [sin[:rows]]
    for p in pos.tolist():
        out_c.append(cos[rows + p][None] if p >= 0 else torch.ones(1, d))
        out_s.append(sin[rows + p][None] if p >= 0 else torch.zeros(1, d))
    return torch.cat(out_c), torch.cat(out_s)


def _qk(layer, h):
    """Queries and keys (N, H, D) of one image from the original layer's own projection weights."""
    heads, d = SIZE["num_attention_heads"], SIZE["hidden_size"] // SIZE["num_attention_heads"]
    attn = getattr(layer, "self_attn", None) or layer.attention
    if hasattr(attn, "qkv"):  # BLIP: one fused projection, [q | k | v]
        w, b = attn.qkv.weight, attn.qkv.bias
        q, k = h @ w[:48].T + b[:48], h @ w[48:96].T + b[48:96]
    else:
        inner = getattr(attn, "attention", attn)  # YOLOS: query/key inside
        wq, wk = (inner.query, inner.key) if hasattr(inner, "query") else (attn.q_proj, attn.k_proj)
        q, k = wq(h), wk(h)
    return q.view(-1, heads, d), k.view(-1, heads, d)


def _naive_class_row(layer, x, rope, class_rows: int):
    """One image's class attention: per head, per class token, a softmax row; their mean (N,)."""
    norm = getattr(layer, "layernorm_before", None) or getattr(layer, "norm1", None) or layer.layer_norm1
    q, k = _qk(layer, norm(x))
    if rope is not None:
        cos, sin = rope
        r = cos.shape[0]
        q = torch.cat([q[:-r], q[-r:] * cos[:, None] + _half_turn(q[-r:]) * sin[:, None]]) if r else q
        k = torch.cat([k[:-r], k[-r:] * cos[:, None] + _half_turn(k[-r:]) * sin[:, None]]) if r else k
    d = q.shape[-1]
    rows = [((q[c, h] @ k[:, h].T) * d ** -0.5).softmax(-1) for h in range(q.shape[1]) for c in range(class_rows)]
    return torch.stack(rows).mean(0)


def _reference(name, layer, x, rope):
    """transformers' own layer on one image (1, N, C), with that image's rotation."""
    if name in ROPE:
        return layer(x, position_embeddings=rope)
    if name.startswith("yolos"):
        return layer(x)
    return layer(x, attention_mask=None)


def _seen_rope(name, args, kwargs):
    if name not in ROPE:
        return None
    return kwargs.get("position_embeddings") or args[1]


@pytest.mark.parametrize("name", NAMES)
def test_each_evit_layer_keeps_what_the_original_layer_computes(name, images):
    """Kept indices = the top class-attention patches; kept rows, prefix and suffix = the original layer's."""
    model, prefix, suffix = _build(name)
    dense = copy.deepcopy(model)
    layers_1b, rates = (2, 4, 5), (0.5, 0.5, 0.5)
    evit_cli.convert(model, keep_rate=0.5, layers=layers_1b)
    record_kept(model)
    seen = {}
    hooks = [_layers(model)[i - 1].register_forward_hook(
        lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, (args[0], _seen_rope(name, args, kwargs), out)),
        with_kwargs=True) for i in layers_1b]
    with torch.no_grad():
        _out(model, images)
    for h in hooks:
        h.remove()
    keep_always = prefix + suffix
    counts = _counts(64 + keep_always, keep_always, rates)
    assert evit_cli.tokens_after_layers(model) == counts
    assert [seen[i][2].shape[1] for i in layers_1b] == counts
    pos = [None] * images.shape[0]  # per image: original patch index of each patch token (-1: fused)
    class_rows = prefix if name == "pixio" else 1
    for i in layers_1b:
        inp, full_rope, out = seen[i]
        kept = _layers(model)[i - 1].evit.kept
        m = inp.shape[1] - keep_always
        for b in range(images.shape[0]):
            rope = _naive_rope(*full_rope, ROPE[name], pos[b]) if name in ROPE else None
            with torch.no_grad():
                ref = _reference(name, _layers(dense)[i - 1], inp[b:b + 1], rope)[0]
                row = _naive_class_row(_layers(dense)[i - 1], inp[b], rope, class_rows)[prefix:prefix + m]
            k = kept.shape[1]
            assert torch.equal(kept[b].sort().values, row.topk(k).indices.sort().values)
            assert (out[b, :prefix] - ref[:prefix]).abs().max() < 1e-5
            assert (out[b, prefix:prefix + k] - ref[prefix:prefix + m][kept[b]]).abs().max() < 1e-5
            if suffix:  # the detection tokens: the original layer's, still last
                assert (out[b, -suffix:] - ref[-suffix:]).abs().max() < 1e-5
            base = torch.arange(m) if pos[b] is None else pos[b]
            pos[b] = torch.cat([base[kept[b]], torch.tensor([-1])])


def test_yolos_mid_position_embeddings_follow_the_kept_tokens(images):
    """After each layer the encoder adds that layer's position row of every remaining token: its patch's,
    the class and detection tokens' own, and none for the fused token."""
    model, prefix, suffix = _build("yolos_det")
    mid = model.vit.encoder.interpolation((32, 32)).detach()  # (L-1, 1, N0, C): transformers' own table
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    record_kept(model)
    ins, outs = {}, {}
    for i, layer in enumerate(_layers(model)):
        layer.register_forward_pre_hook(lambda mod, args, i=i: ins.__setitem__(i, args[0]))
        layer.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
    with torch.no_grad():
        model(images)
    pos = [torch.arange(64)] * images.shape[0]
    for i in range(5):
        kept = _layers(model)[i].evit.kept
        if kept is not None:
            pos = [torch.cat([p[kept[b]], torch.tensor([-1])]) for b, p in enumerate(pos)]
        for b, p in enumerate(pos):
            rows = [mid[i, 0, :prefix]]
            rows += [mid[i, 0, prefix + j][None] if j >= 0 else torch.zeros(1, 48) for j in p.tolist()]
            rows.append(mid[i, 0, -suffix:])
            assert (ins[i + 1][b] - outs[i][b] - torch.cat(rows)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["metaclip2", "blip", "pixio", "dinov3", "mlcd", "yolos_det"])
def test_forward_and_backward_run(name, images):
    model, _, _ = _build(name)
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    model.train()
    _out(model, images).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if any(s in n for s in ("q_proj", "qkv", "query"))]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["blip", "pixio", "dinov3", "mlcd", "yolos_det"])
def test_torchscript_export_matches_pytorch(name, tmp_path):
    from evit_cli.io.export import export

    model, _, _ = _build(name)
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    r = export(model, "torchscript", tmp_path / "m.pt", check_batches=(2,))
    assert r["tokens_after_layers"] == evit_cli.tokens_after_layers(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got, expected = torch.jit.load(str(tmp_path / "m.pt"))(x), _out(model, x)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["dinov3", "yolos_det"])  # positions gathered per image inside the graph
def test_onnx_export_matches_pytorch(name, tmp_path):
    from test_export import _onnx_run

    from evit_cli.io.export import export

    model, _, _ = _build(name)
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    export(model, "onnx", tmp_path / "m.onnx", check_batches=(1,))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (_onnx_run(tmp_path / "m.onnx", x) - _out(model, x)).abs().max() < 1e-4


@pytest.mark.parametrize("cls, cfg, match", [
    (tf.OwlViTForObjectDetection, tf.OwlViTConfig(vision_config=V, text_config=TEXT),
     "box from every patch.*OwlViTVisionModel"),
    (tf.BlipForConditionalGeneration, tf.BlipConfig(vision_config=V, text_config=TEXT),
     "reads or writes text with the image"),
    (tf.VitDetBackbone, tf.VitDetConfig(**V, out_features=["stage2"]), "map of every patch"),
])
def test_heads_that_need_every_patch_or_text_are_refused_in_one_line(cls, cfg, match):
    with pytest.raises(evit_cli.EvitError, match=match) as e:
        evit_cli.convert(cls(cfg), keep_rate=0.5, layers=(2,))
    assert "\n" not in str(e.value)


def test_prefix_and_token_counts_come_from_the_config():
    adapter = evit_cli.adapters.get_adapter
    for name, (_, prefix, suffix) in BUILD.items():
        model, _, _ = _build(name)
        a = adapter(model)
        assert a.num_prefix_tokens(model) == prefix + suffix, name
        assert a.num_tokens(model) == 64 + prefix + suffix, name


# --------------------------------------------------------------------------- real hub files (tests/hub/README.md)


def test_blip_captioning_checkpoint_is_refused_and_its_saved_tower_converts(tmp_path, capsys):
    """Salesforce/blip-image-captioning-base's files: the captioning model reads text, so the CLI refuses it in
    one line; its vision tower, saved as the refusal says, converts with its weights and the hub preprocessing."""
    from test_cli import run
    from test_transformers_hub import HUB, _hf_pixels, _photo, _shrunk

    from evit_cli.io.images import transforms

    hub = HUB / "Salesforce__blip-image-captioning-base"
    folder = _shrunk(hub, tmp_path / "blip")
    code, _, err = run(["convert", folder, "--no-pretrained", "-o", tmp_path / "refused"], capsys)
    assert code == 2 and "reads or writes text" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    cfg = tf.BlipConfig.from_pretrained(folder)
    cfg.vision_config.image_size = 64  # the published width and patch, fewer patches: fast
    tower = randomize(tf.BlipForConditionalGeneration(cfg).vision_model)
    tower.save_pretrained(tmp_path / "tower")
    (tmp_path / "tower" / "preprocessor_config.json").write_bytes((hub / "preprocessor_config.json").read_bytes())
    code, _, err = run(["convert", tmp_path / "tower", "-k", "0.7", "-l", "1,2", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    model = evit_cli.load(tmp_path / "out")
    assert type(model).__name__ == "BlipVisionModel"
    dc = evit_cli.adapters.get_adapter(model).data_config(model)
    expected = _hf_pixels(hub)  # transformers' BlipImageProcessor with the published settings: 384 px squashed
    assert dc["input_size"] == tuple(expected.shape) == (3, 384, 384)
    assert (transforms(dc, train=False)(_photo()) - expected).abs().mean() < 2e-4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(evit_cli.dense_copy(model)(x).pooler_output, tower(x).pooler_output)  # its weights


def test_owlvit_detection_checkpoint_converts_as_its_image_tower(tmp_path, capsys):
    """google/owlvit-base-patch32's config.json (as transformers 5.2 re-saves it): the CLI builds the image tower,
    with the checkpoint's tower weights; 768 px in 32 px patches -> 577 tokens."""
    from test_cli import run
    from test_transformers_hub import HUB, _shrunk

    folder = _shrunk(HUB / "google__owlvit-base-patch32__resaved-5.2.0", tmp_path / "owl")
    code, _, err = run(["convert", folder, "--no-pretrained", "-k", "0.7", "-l", "1,2", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    model = evit_cli.load(tmp_path / "out")
    assert type(model).__name__ == "OwlViTVisionModel"
    assert evit_cli.adapters.get_adapter(model).data_config(model)["input_size"] == (3, 768, 768)
    assert evit_cli.tokens_after_layers(model) == [1 + math.ceil(0.7 * 576) + 1, 1 + math.ceil(0.7 * 405) + 1]
    detector = randomize(tf.OwlViTForObjectDetection(tf.OwlViTConfig(vision_config=V, text_config=TEXT)))
    detector.save_pretrained(tmp_path / "tiny")
    code, _, err = run(["convert", tmp_path / "tiny", "-k", "1.0", "-l", "2,4", "-o", tmp_path / "tiny_out"], capsys)
    assert code == 0, err
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = evit_cli.load(tmp_path / "tiny_out")(x).pooler_output
        assert torch.equal(got, detector.owlvit.vision_model(x).pooler_output)  # the tower's weights, loaded


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("yolos")])
def test_squeeze_keeps_the_original_at_keep_1_and_agrees_across_attention(name, images):
    """The squeeze method in every tower (RoPE, pooled class tokens, fused qkv): keep 1.0 is the original
    model, and at 0.5 eager and sdpa agree on prefix + kept tokens (no fused token)."""
    outs = []
    for attn in ("eager", "sdpa"):
        model, prefix, _ = _build(name, attn)
        dense = copy.deepcopy(model)
        with torch.no_grad():
            expected = _out(dense, images)
            evit_cli.convert(model, keep_rate=1.0, layers=(2, 4), method="squeeze")
            assert (_out(model, images) - expected).abs().max() < 1e-5
            evit_cli.convert(model, keep_rate=0.5, layers=(2, 4), method="squeeze")
            outs.append(_out(model, images))
        assert evit_cli.tokens_after_layers(model) == [prefix + 32, prefix + 16]
    assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_squeeze_refuses_yolos_detection_tokens():
    model, _, _ = _build("yolos", "sdpa")
    with pytest.raises(evit_cli.EvitError, match="keeps tokens after its patches"):
        evit_cli.convert(model, keep_rate=0.5, layers=(2,), method="squeeze")
