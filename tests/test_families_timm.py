"""Every supported timm family, on tiny random models, against timm's own blocks.

Each EViT block is checked against the dense (original timm) block run on the
same input: for the first EViT block with the model's own position terms, for
later ones with position terms the test gathers itself, per image, with plain
indexing (RoPE rows of the kept patches, cos 1 / sin 0 for the fused token;
bias rows and columns of the kept patches, zero for the fused token).
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import evit_cli
from evit_cli.adapters import record_kept
from conftest import randomize

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
LAYERS = (2, 3)
NUM_PATCHES = 64

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "vit_respost": ("vit_tiny_patch16_224", {"block_fn": ResPostBlock}),
    "vit_parallel_things": ("vit_small_patch16_18x2_224", {}),
    "vit_parallel_scaling": ("vit_base_patch16_xp_224", {}),
    "eva02": ("eva02_tiny_patch14_224", {}),
    "eva02_clip": ("eva02_base_patch16_clip_224", {}),
    "eva_post_norm": ("eva02_tiny_patch14_224", {"use_post_norm": True}),
    "dinov3": ("vit_small_patch16_dinov3", {}),
    "pe_core": ("vit_pe_core_tiny_patch16_384", {}),
    "rope_vit": ("vit_small_patch16_rope_224", {}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),
    "beit": ("beit_base_patch16_224", {}),
    "beit_shared_bias": ("beit_base_patch16_224", {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}),
    "relpos_cls": ("vit_relpos_base_patch16_cls_224", {}),
    "relpos_shared": ("vit_srelpos_small_patch16_224", {"class_token": True, "global_pool": "token"}),
    "relpos_res_post": ("vit_relpos_small_patch16_rpn_224", {"class_token": True, "global_pool": "token"}),
}


def tiny(family: str, **overrides):
    name, kwargs = FAMILIES[family]
    return randomize(timm.create_model(name, pretrained=False, **{**TINY, **kwargs, **overrides}))


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _lengths(model, x):
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_rate_1_is_the_original_model(family, x):
    model = tiny(family)
    with torch.no_grad():
        ref = model(x)
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=LAYERS)
    with torch.no_grad():
        assert (evit(x) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fuse", [True, False])
def test_token_counts_at_keep_05_match_an_independent_count(family, fuse, x):
    model = evit_cli.convert(tiny(family), keep_rate=0.5, layers=LAYERS, fuse=fuse)
    p = model.num_prefix_tokens
    expected, m = [], NUM_PATCHES
    for layer in range(1, TINY["depth"] + 1):
        if layer in LAYERS:
            m = math.ceil(m / 2) + (1 if fuse else 0)
        expected.append(p + m)
    out, seen = _lengths(model, x)
    assert seen == expected and out.shape == (2, 10)


# ------------------------------------------------------------ block by block


def _gather_rope(full, pos):
    """Per image: the rope rows (..., N, D) of ``pos``; identity (sin 0, cos 1) for -1."""
    d = full.shape[-1]
    identity = torch.cat([torch.zeros(d // 2), torch.ones(d - d // 2)])
    rows = []
    for img_pos in pos.tolist():
        rows.append(torch.stack([full[..., j, :] if j >= 0 else identity.expand_as(full[..., 0, :]) for j in img_pos], dim=-2))
    out = torch.stack(rows)
    return out if out.dim() == 4 else out.unsqueeze(1)  # (B, 1 or H, M, D)


def _gather_bias(full, pos, p):
    """Per image: rows and columns [prefix, kept patches, fused] of a (1, H, P+N, P+N) bias; zero for -1."""
    full = full if full.dim() == 4 else full[None]
    out = []
    for img_pos in pos.tolist():
        idx = list(range(p)) + [p + j if j >= 0 else -1 for j in img_pos]
        b = torch.zeros(full.shape[1], len(idx), len(idx))
        for r, i in enumerate(idx):
            for c, j in enumerate(idx):
                if i >= 0 and j >= 0:
                    b[:, r, c] = full[0, :, i, j]
        out.append(b)
    return torch.stack(out)


def _dense_call(family, dense_blk, args, kwargs, pos, p):
    """The dense block's call for tokens at ``pos`` (None: all patches, the model's own terms)."""
    kwargs = dict(kwargs)
    if pos is None:
        return dense_blk, args, kwargs
    if family.startswith("beit"):
        blk = copy.deepcopy(dense_blk)
        full = kwargs.get("shared_rel_pos_bias")
        if blk.attn.relative_position_bias_table is not None:
            own = blk.attn._get_rel_pos_bias()
            full = own if full is None else full + own
            blk.attn.relative_position_bias_table = None
        kwargs["shared_rel_pos_bias"] = _gather_bias(full, pos, p)
        return blk, args, kwargs
    if family.startswith("relpos"):
        blk = copy.deepcopy(dense_blk)
        full = blk.attn.rel_pos.get_bias() if blk.attn.rel_pos is not None else kwargs["shared_rel_pos"]
        blk.attn.rel_pos = None
        kwargs["shared_rel_pos"] = _gather_bias(full, pos, p)
        return blk, args, kwargs
    if kwargs.get("rope") is not None:
        kwargs["rope"] = _gather_rope(kwargs["rope"], pos)
    return dense_blk, args, kwargs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fuse", [True, False])
def test_each_evit_block_keeps_the_dense_blocks_outputs(family, fuse, x):
    """Kept rows of an EViT block's output == the dense block's output rows (the FFN is per token,
    so for "between" blocks this is the pre-FFN state too); later blocks see their tokens' positions."""
    dense = tiny(family)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS, fuse=fuse)
    p = model.num_prefix_tokens
    calls = {}
    hooks = [b.register_forward_hook(lambda m, a, kw, o, i=i: calls.__setitem__(i, (a, kw, o)), with_kwargs=True)
             for i, b in enumerate(model.blocks)]
    record_kept(model)
    with torch.no_grad():
        model(x)
    pos = None
    for i in range(TINY["depth"]):
        args, kwargs, out = calls[i]
        blk, dargs, dkwargs = _dense_call(family, dense.blocks[i], args[1:], kwargs, pos, p)
        with torch.no_grad():
            ref = blk(args[0], *dargs, **dkwargs)
        kept = getattr(model.blocks[i], "evit_kept", None)
        if kept is None:
            assert (out - ref).abs().max() < 1e-4, f"block {i + 1}"
            continue
        k = kept.shape[1]
        ref_kept = torch.stack([ref[b, p + kept[b]] for b in range(2)])
        assert (out[:, :p] - ref[:, :p]).abs().max() < 1e-4, f"block {i + 1} prefix"
        assert (out[:, p:p + k] - ref_kept).abs().max() < 1e-4, f"block {i + 1} kept"
        old = torch.arange(args[0].shape[1] - p).expand(2, -1) if pos is None else pos
        pos = torch.stack([old[b, kept[b]] for b in range(2)])
        if fuse:
            pos = torch.cat([pos, torch.full((2, 1), -1)], dim=1)


def _dense_class_row(blk, x, call):
    """Mean over heads of row 0 of the attention matrix timm's own (unfused) attention forms."""
    rows = []
    attns = [br.attn for br in blk.attns] if hasattr(blk, "attns") else [getattr(blk, "attn", blk)]
    hooks = []
    for a in attns:
        a.fused_attn = False
        hooks.append(a.attn_drop.register_forward_hook(lambda m, i, o: rows.append(i[0][:, :, 0].mean(1))))
    with torch.no_grad():
        blk(x, **call)
    for h in hooks:
        h.remove()
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("family", ["vit", "vit_parallel_things", "vit_parallel_scaling", "eva02", "dinov3", "pe_core",
                                    "rope_mixed", "beit", "beit_shared_bias", "relpos_cls", "relpos_shared"])
def test_the_ranking_row_is_the_blocks_own_attention(family, x):
    """The class row EViT ranks by equals the one timm's attention computes (RoPE rotated, bias added),
    in the first EViT block and in the second, whose tokens are the kept ones of the first."""
    dense = tiny(family)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS)
    p = model.num_prefix_tokens
    rows, calls = {}, {}
    for i in (1, 2):
        model.blocks[i].evit_rank = lambda blk, x_, row, i=i: rows.__setitem__(i, row)  # None: rank by the row
        model.blocks[i].register_forward_hook(lambda m, a, kw, o, i=i: calls.__setitem__(i, (a, kw)), with_kwargs=True)
    record_kept(model)
    with torch.no_grad():
        model(x)
    kept = model.blocks[1].evit_kept
    pos = torch.cat([kept, torch.full((2, 1), -1)], dim=1)  # the tokens entering block 3: kept + fused
    for i, at in ((1, None), (2, pos)):
        args, kwargs = calls[i]
        blk, _, dkwargs = _dense_call(family, dense.blocks[i], (), kwargs, at, p)
        assert (rows[i] - _dense_class_row(blk, args[0], dkwargs)).abs().max() < 1e-5, f"block {i + 1}"


@pytest.mark.parametrize("family", ["vit", "eva02", "dinov3", "beit", "vit_parallel_scaling"])
def test_forward_backward_and_revert(family, x):
    dense = tiny(family)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS).train()
    model(x).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    evit_cli.revert(model.eval())
    assert type(model) is type(dense) and all(type(a) is type(b) for a, b in zip(model.blocks, dense.blocks))
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-5


# ------------------------------------------------------------ features


@pytest.mark.parametrize("family", ["vit", "eva02", "dinov3", "beit"])
def test_headless_model_and_forward_features(family, x):
    model = evit_cli.convert(tiny(family, num_classes=0), keep_rate=0.5, layers=LAYERS)
    p = model.num_prefix_tokens
    with torch.no_grad():
        assert model(x).shape == (2, 48)
        assert model.forward_features(x).shape == (2, p + 17 + 1, 48)  # 64 -> 33 (32 + fused) -> 18 (17 + fused)


@pytest.mark.parametrize("family", ["vit", "eva02", "beit"])
def test_forward_intermediates_give_the_remaining_tokens_and_full_maps(family, x):
    dense = tiny(family)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS)
    record_kept(model)
    with torch.no_grad():
        nlc = model.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NLC", intermediates_only=True)
        assert [t.shape[1] for t in nlc] == [64, 33, 18, 18]  # non-prefix tokens after each block (EViT in 2 and 3)
        kept2 = model.blocks[1].evit_kept
        final, maps = model.forward_intermediates(x, indices=[0, 1, 2, 3])
        dense_maps = dense.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    assert all(m.shape == (2, 48, 8, 8) for m in maps)
    assert (maps[0] - dense_maps[0]).abs().max() < 1e-5  # before any EViT block: timm's own map
    grid = maps[1].flatten(2).transpose(1, 2)  # (B, 64, C) after block 2
    for b in range(2):
        kept = set(kept2[b].tolist())
        for j in range(64):  # a kept patch holds its token, every other one the fused token
            expected = nlc[1][b, kept2[b].tolist().index(j)] if j in kept else nlc[1][b, 32]
            assert torch.equal(grid[b, j], expected)
    assert final.shape[1] == model.num_prefix_tokens + 18


def test_features_only_wrapper_is_refused_and_its_model_converts(x):
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, **{**TINY, "num_classes": 0})
    with pytest.raises(evit_cli.EvitError, match="features_only") as e:
        evit_cli.convert(net, keep_rate=0.5, layers=LAYERS)
    assert "\n" not in str(e.value)
    with torch.no_grad():
        dense = [f.shape for f in net(x)]
        evit_cli.convert(net.model, keep_rate=0.5, layers=LAYERS)
        assert [f.shape for f in net(x)] == dense and dense[-1] == (2, 48, 8, 8)


# ------------------------------------------------------------ refusals


def _meta(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw)


@pytest.mark.parametrize("name, kwargs, words", [
    ("vit_medium_patch16_gap_256", {}, "no class token (it pools by global average)"),
    ("vit_base_patch16_siglip_224", {}, "no class token (it pools by attention pool (MAP))"),
    ("vit_base_patch16_rope_reg1_gap_256", {}, "no class token"),
    ("cait_xxs24_224", {}, "only in its last class-attention blocks"),
    ("xcit_nano_12_p16_224", {}, "only in its last class-attention blocks"),
    ("crossvit_tiny_240", {}, "is a ViT with a class token, but its two-branch cross attention"),
    ("tnt_s_patch16_224", {}, "is a ViT with a class token, but its pixel-level inner transformer"),
    ("resnet18", {}, "is not a supported Vision Transformer"),
])
def test_refusals_are_one_true_line(name, kwargs, words):
    model = _meta(name, **kwargs)
    with pytest.raises(evit_cli.EvitError) as e:
        evit_cli.convert(model, keep_rate=0.7, layers=(2,))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_an_unsupported_block_in_a_supported_family_is_named():
    from timm.models.vision_transformer import DiffAttention

    model = tiny("vit", attn_layer=DiffAttention)
    with pytest.raises(evit_cli.EvitError, match="is a ViT with a class token, but its DiffAttention attention"):
        evit_cli.convert(model, keep_rate=0.7, layers=(2,))


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_save_and_load_round_trip(name, tmp_path, x):
    from evit_cli.loading import create_timm

    model = evit_cli.convert(randomize(create_timm(name, pretrained=False, **TINY)), keep_rate=0.5, layers=LAYERS)
    loaded = evit_cli.load(evit_cli.save(model, tmp_path / "m"))
    assert type(loaded) is type(model) and evit_cli.tokens_after_layers(loaded) == evit_cli.tokens_after_layers(model)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() < 1e-6


def test_a_users_subclass_of_a_family_converts(x):
    from timm.models.vision_transformer import VisionTransformer

    class MyViT(VisionTransformer):
        pass

    model = randomize(MyViT(**{**TINY, "depth": 4}))
    with torch.no_grad():
        ref = model(x)
        evit_cli.convert(model, keep_rate=1.0, layers=LAYERS)
        assert isinstance(model, MyViT) and (model(x) - ref).abs().max() < 1e-5
