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
from conftest import randomize
from timm.models.vision_transformer import ResPostBlock

import evit_cli
from evit_cli.adapters import record_kept
from evit_cli.adapters.block import state_of
from evit_cli.algorithm.restore import RestoreSpec
from evit_cli.algorithm.state import model_state

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
    # C-RADIO: class token + 7 registers; NaFlexVit keeps no img_size, its size is the pretrained config's
    "naflex_radio": ("naflexvit_base_patch16_radio_v3", {"pretrained_cfg_overlay": {"input_size": (3, 32, 32)}}),
}


def _kept(blk):
    """The kept indices a block recorded (None: it removed nothing, or it is no EViT block)."""
    st = state_of(blk)
    return st.kept if st is not None else None


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
        rows.append(torch.stack([full[..., j, :] if j >= 0 else identity.expand_as(full[..., 0, :])
                                 for j in img_pos], dim=-2))
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
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda m, a, kw, o, i=i: calls.__setitem__(i, (a, kw, o)), with_kwargs=True)
    record_kept(model)
    with torch.no_grad():
        model(x)
    pos = None
    for i in range(TINY["depth"]):
        args, kwargs, out = calls[i]
        blk, dargs, dkwargs = _dense_call(family, dense.blocks[i], args[1:], kwargs, pos, p)
        with torch.no_grad():
            ref = blk(args[0], *dargs, **dkwargs)
        kept = _kept(model.blocks[i])
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
                                    "rope_mixed", "beit", "beit_shared_bias", "relpos_cls", "relpos_shared",
                                    "naflex_radio"])
def test_the_ranking_row_is_the_blocks_own_attention(family, x):
    """The class row EViT ranks by equals the one timm's attention computes (RoPE rotated, bias added),
    in the first EViT block and in the second, whose tokens are the kept ones of the first."""
    dense = tiny(family)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS)
    p = model.num_prefix_tokens
    rows, calls = {}, {}
    for i in (1, 2):
        model.blocks[i].evit.rank = lambda blk, x_, row, i=i: rows.__setitem__(i, row)  # None: rank by the row
        model.blocks[i].register_forward_hook(lambda m, a, kw, o, i=i: calls.__setitem__(i, (a, kw)), with_kwargs=True)
    record_kept(model)
    with torch.no_grad():
        model(x)
    kept = model.blocks[1].evit.kept
    pos = torch.cat([kept, torch.full((2, 1), -1)], dim=1)  # the tokens entering block 3: kept + fused
    for i, at in ((1, None), (2, pos)):
        args, kwargs = calls[i]
        blk, _, dkwargs = _dense_call(family, dense.blocks[i], (), kwargs, at, p)
        assert (rows[i] - _dense_class_row(blk, args[0], dkwargs)).abs().max() < 1e-5, f"block {i + 1}"


@pytest.mark.parametrize("family", ["vit", "eva02", "dinov3", "beit", "vit_parallel_scaling", "naflex_radio"])
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


@pytest.mark.parametrize("family", ["vit", "eva02", "dinov3", "beit", "naflex_radio"])
def test_headless_model_and_forward_features(family, x):
    model = evit_cli.convert(tiny(family, num_classes=0), keep_rate=0.5, layers=LAYERS)
    p = model.num_prefix_tokens
    with torch.no_grad():
        assert model(x).shape == (2, 48)
        assert model.forward_features(x).shape == (2, p + 17 + 1, 48)  # 64 -> 33 (32 + fused) -> 18 (17 + fused)


@pytest.mark.parametrize("family", ["vit", "eva02", "beit", "naflex_radio"])
def test_forward_intermediates_give_the_remaining_tokens_and_full_maps(family, x):
    dense = tiny(family)
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS)
    model_state(model).positions.restore_with = RestoreSpec("fused")  # the default: tests/adapters/test_dense.py
    record_kept(model)
    with torch.no_grad():
        nlc = model.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NLC", intermediates_only=True)
        assert [t.shape[1] for t in nlc] == [64, 33, 18, 18]  # non-prefix tokens after each block (EViT in 2 and 3)
        kept2 = model.blocks[1].evit.kept
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
    ("vit_medium_patch16_gap_256", {"global_pool": "max"}, "no class token and pools by global max"),
    ("vit_base_patch16_siglip_224", {"global_pool": "avgmax"}, "no class token and pools by global average and max"),
    ("cait_xxs24_224", {}, "only in its last class-attention blocks"),
    ("xcit_nano_12_p16_224", {}, "only in its last class-attention blocks"),
    ("naflexvit_base_patch16_radio_v3", {"rope_type": "axial"},
     "is a ViT with a class token, but its RoPE in a NaFlexVit"),
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
    from evit_cli.io.resolve import create_timm

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


# ------------------------------------------------------------ NaFlexViT


def test_naflex_counts_are_predicted_and_patch_dictionaries_are_refused(x):
    model = evit_cli.convert(tiny("naflex_radio"), keep_rate=0.5, layers=LAYERS)
    _, seen = _lengths(model, x)
    assert evit_cli.tokens_after_layers(model) == [seen[1], seen[2]] == [8 + 33, 8 + 18]
    patches = {"patches": torch.randn(2, 64, 48), "patch_coord": torch.zeros(2, 64, 2, dtype=torch.long),
               "patch_valid": torch.ones(2, 64, dtype=torch.bool)}
    for call in (lambda: model(patches), lambda: model.forward_intermediates(patches)):
        with pytest.raises(evit_cli.EvitError, match="fixed-size mode only") as e:
            call()
        assert "\n" not in str(e.value)


# ------------------------------------------------------------ CrossViT
# Two branches (8 x 8 and 4 x 4 patches here), each with its own class token; layer L is the
# L-th multi-scale stage, where the first block of each branch reorganizes its own tokens.

CROSSVIT = dict(img_size=32, img_scale=(1.0, 1.0), patch_size=[4, 8], embed_dim=[48, 96], num_heads=[3, 3],
                depth=[[1, 2, 0]] * 3, mlp_ratio=[2, 2, 1], num_classes=10)
BRANCH_PATCHES = (64, 16)


def tiny_crossvit(**overrides):
    return randomize(timm.create_model("crossvit_tiny_240", pretrained=False, **{**CROSSVIT, **overrides}))


def _branch_blocks(model):
    """Every transformer block, as (stage, branch, index in the branch's stage, block)."""
    return [(s, b, j, blk) for s, stage in enumerate(model.blocks) for b, seq in enumerate(stage.blocks)
            for j, blk in enumerate(seq)]


def _crossvit_lengths(model, x):
    seen = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=(s, b, j): seen.__setitem__(k, o.shape[1]))
             for s, b, j, blk in _branch_blocks(model)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


def test_crossvit_keep_rate_1_is_the_original_model(x):
    model = tiny_crossvit()
    with torch.no_grad():
        ref = model(x)
        evit = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=(1, 2, 3))
        assert (evit(x) - ref).abs().max() < 1e-5
        for blk in evit_cli.adapters.all_evit_blocks(evit):  # the EViT path itself, forced to run at keep 1.0
            blk.evit.rank = lambda *a: None
        assert len(evit_cli.adapters.all_evit_blocks(evit)) == 6 and (evit(x) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("fuse", [True, False])
def test_crossvit_token_counts_of_both_branches_at_keep_05(fuse, x):
    from evit_cli.measure.bench import measure_tokens

    model = evit_cli.convert(tiny_crossvit(), keep_rate=0.5, layers=LAYERS, fuse=fuse)
    out, seen = _crossvit_lengths(model, x)
    for b, patches in enumerate(BRANCH_PATCHES):
        m = patches
        for s in range(3):
            if s + 1 in LAYERS:
                m = math.ceil(m / 2) + (1 if fuse else 0)
            # branch 0: 1 block a stage, branch 1: 2
            stage = [n for (s_, b_, _), n in seen.items() if (s_, b_) == (s, b)]
            assert stage == [1 + m] * (1 + b), (s, b)
    assert out.shape == (2, 10)
    # the single-sequence interface reports branch 0: 65 -> 34 -> 19 with fusion
    branch0 = [seen[(s - 1, 0, 0)] for s in LAYERS]
    assert evit_cli.tokens_after_layers(model) == measure_tokens(model, 32) == branch0
    assert evit_cli.model_state(model).config.layers == LAYERS and len(evit_cli.adapters.evit_blocks(model)) == 2


@pytest.mark.parametrize("fuse", [True, False])
def test_crossvit_each_block_keeps_the_dense_blocks_outputs(fuse, x):
    """Every transformer block of both branches against the dense block on the same input: EViT blocks
    give the dense rows of their class token and kept tokens, each branch ranking by its own class
    token's attention (the row timm's own attention forms); the other blocks and the cross-attention
    fusion, fed the shorter sequences, are timm's own."""
    dense = tiny_crossvit()
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS, fuse=fuse)
    calls, rows = {}, {}
    for s, b, j, blk in _branch_blocks(model):
        blk.register_forward_hook(lambda m, a, o, k=(s, b, j): calls.__setitem__(k, (a[0], o)))
        if state_of(blk) is not None and blk.evit.reorganizes:
            blk.evit.rank = lambda blk_, x_, row, k=(s, b, j): rows.__setitem__(k, row)
    fusions = {}
    for s, stage in enumerate(model.blocks):
        for b, f in enumerate(stage.fusion):
            f.register_forward_hook(lambda m, a, o, k=(s, b): fusions.__setitem__(k, (a[0], o)))
    record_kept(model)
    with torch.no_grad():
        model(x)
    dense_blocks = {(s, b, j): blk for s, b, j, blk in _branch_blocks(dense)}
    checked = 0
    for key, (inp, out) in calls.items():
        with torch.no_grad():
            ref = dense_blocks[key](inp)
        evit_blk = model.blocks[key[0]].blocks[key[1]][key[2]]
        kept = _kept(evit_blk)
        if kept is None:
            assert out.shape == inp.shape and (out - ref).abs().max() < 1e-4, key
            continue
        checked += 1
        assert (rows[key] - _dense_class_row(copy.deepcopy(dense_blocks[key]), inp, {})).abs().max() < 1e-5, key
        k = kept.shape[1]
        assert out.shape[1] == 1 + k + (1 if fuse else 0)
        assert (out[:, :1] - ref[:, :1]).abs().max() < 1e-4, key
        assert (out[:, 1:1 + k] - torch.stack([ref[i, 1 + kept[i]] for i in range(2)])).abs().max() < 1e-4, key
        if fuse:  # the fused token: the inattentive tokens (after attention) weighted by their class attention
            pre = torch.stack([inp[i] + dense_blocks[key].attn(dense_blocks[key].norm1(inp[i:i + 1]))[0]
                               for i in range(2)])
            weights = rows[key][:, 1:].scatter(1, kept, 0.0)
            fused_pre = (weights.unsqueeze(-1) * pre[:, 1:]).sum(1)
            blk = dense_blocks[key]
            expected = fused_pre + blk.mlp(blk.norm2(fused_pre))
            assert (out[:, -1] - expected).abs().max() < 1e-4, key
    assert checked == 2 * len(LAYERS)
    for key, (inp, out) in fusions.items():  # one class token out, from the other branch's remaining tokens
        with torch.no_grad():
            assert out.shape[1] == 1 and (dense.blocks[key[0]].fusion[key[1]](inp) - out).abs().max() < 1e-5


def test_crossvit_forward_backward_revert_and_schedules(x):
    dense = tiny_crossvit()
    model = evit_cli.convert(copy.deepcopy(dense), keep_rate=0.5, layers=LAYERS).train()
    model(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    evit_cli.adapters.set_keep_rates(model.eval(), [1.0, 0.25])  # per layer, in both branches
    assert [b.evit.keep_rate for b in evit_cli.adapters.all_evit_blocks(model)] == [1.0, 1.0, 0.25, 0.25]
    _, seen = _crossvit_lengths(model, x)
    assert (seen[(2, 0, 0)], seen[(2, 1, 0)]) == (1 + 16 + 1, 1 + 4 + 1)
    evit_cli.revert(model)
    assert type(model) is type(dense) and not evit_cli.adapters.all_evit_blocks(model)
    assert all(type(a[3]) is type(b[3]) for a, b in zip(_branch_blocks(model), _branch_blocks(dense)))
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 1e-5


def test_crossvit_intermediates_oracle_and_resizing_answer_in_one_line(x):
    from evit_cli.model.oracle import Oracle

    model = evit_cli.convert(tiny_crossvit(), keep_rate=0.5, layers=LAYERS)
    with torch.no_grad():
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, indices=[0, 1, 2, 3, 4, 5])
    assert [t.shape[1] for t in nlc] == [64, 33, 18, 16, 9, 6]  # branch 0's stages, then branch 1's
    calls = [lambda: model.forward_intermediates(x), lambda: Oracle(model, tiny_crossvit()),
             lambda: evit_cli.adapters.get_adapter(model).set_img_size(model, 64)]
    for call, words in zip(calls, ["output_fmt='NLC'", "a CrossViT's two branches", "no set_input_size"]):
        with pytest.raises(evit_cli.EvitError, match=words) as e:
            call()
        assert "\n" not in str(e.value)


def test_crossvit_layers_are_its_stages():
    with pytest.raises(evit_cli.EvitError, match="layer 4 is out of range: the model has 3 blocks"):
        evit_cli.convert(tiny_crossvit(), keep_rate=0.7, layers=(4,))


def test_crossvit_torchscript_export_matches_pytorch(tmp_path):
    """ONNX works too (``evit export --format onnx``, checked by hand) but costs ~15 s of CPU here."""
    from evit_cli.io.export import export

    model = evit_cli.convert(tiny_crossvit(), keep_rate=0.5, layers=LAYERS)
    # runs the file and compares it with PyTorch
    r = export(model, "torchscript", tmp_path / "m.pt", check_batches=(1, 3))
    assert r["tokens_after_layers"] == [34, 19] and max(r["max_abs_diff"].values()) < 1e-4
