"""timm towers without a class token (global-average and attention-pool (MAP) heads), on tiny random
models of timm's own classes: keep 1.0 is the original model exactly; below it, the converted model
equals an independent, naive forward written from docs/algorithm.md (tests/reference.py); outputs keep
the original shapes, and the token counts are the predicted ones."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import randomize
from reference import reference_free_forward

import evit_cli
from evit_cli.adapters import evit_blocks

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
LAYERS, RATES = (2, 3), (0.5, 0.6)

# name -> kwargs: a global-average ViT, the same with registers, a SigLIP-style MAP tower, AIMv2, NaFlexViT
TOWERS = {
    "vit_avg": ("vit_base_patch16_224", {"global_pool": "avg", "class_token": False}),
    "vit_avg_registers": ("vit_base_patch16_reg4_gap_256", {}),
    "vit_map": ("vit_base_patch16_siglip_224", {}),
    "aimv2": ("aimv2_large_patch14_224", {}),
}
NAFLEX = {"naflex_map": "naflexvit_base_patch16_map", "naflex_gap": "naflexvit_base_patch16_gap"}


def tiny(family: str) -> torch.nn.Module:
    name, kwargs = TOWERS[family]
    return randomize(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))


def _scores(model) -> list[str]:
    return ["mean_query", "received"] + ["probe"] * (model.attn_pool is not None)


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_keep_one_is_the_original_model(family):
    model = tiny(family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        for score in _scores(model):
            evit = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=LAYERS, score=score)
            assert torch.equal(evit(x), dense), score


@pytest.mark.parametrize("family", sorted(TOWERS))
def test_reorganized_tower_equals_the_naive_reference(family):
    model = tiny(family)
    x = torch.randn(2, 3, 32, 32)
    for score in _scores(model):
        evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS, score=score)
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in evit_blocks(evit)]
        with torch.no_grad():
            out = evit(x)
            ref = reference_free_forward(model, x, LAYERS, RATES, score)
        for h in hooks:
            h.remove()
        assert out.shape == model(x).shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=f"{family} {score}")
        assert seen[:2] == evit_cli.tokens_after_layers(evit)


@pytest.mark.parametrize("score", ["mean_query", "received"])
def test_a_class_token_model_ranked_without_its_class_token(score):
    """A class token present but not read for ranking (how the scores are measured on the real DeiT-Tiny):
    the head still reads the class token, unweighted."""
    model = randomize(timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY))
    x = torch.randn(2, 3, 32, 32)
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS, score=score)
    with torch.no_grad():
        torch.testing.assert_close(evit(x), reference_free_forward(model, x, LAYERS, RATES, score),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, kwargs", [
    ("vit_relpos_base_patch16_224", {}),  # ViT-RelPos pools inside its forward_head
    ("vit_base_patch16_224", {"global_pool": "avg", "class_token": False}),
    ("beit_base_patch16_224", {}),  # a class token, average pooling, ranked without it
])
def test_the_pool_sees_each_token_as_the_patches_it_holds(name, kwargs):
    """The converted model's output equals the original head on its last tokens, each repeated as many times as
    the patches it holds (the sizes recorded when the final norm runs)."""
    model = randomize(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS, score="received")
    seen = {}

    def keep(module, args, out):
        seen["x"], seen["sizes"] = out, evit_cli.model_state(evit).positions.sizes.clone()

    evit.norm.register_forward_hook(keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = evit(x)
        p = model.num_prefix_tokens
        want = torch.stack([model.forward_head(torch.cat([seen["x"][b, :p], seen["x"][b, p:].repeat_interleave(
            seen["sizes"][b].long(), 0)])[None])[0] for b in range(2)])
    assert seen["x"].shape[1] < 64 + p
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_default_score_without_a_class_token_is_the_class_token_free_default():
    model = evit_cli.convert(tiny("vit_avg"), layers=LAYERS)
    assert evit_cli.model_state(model).config.score == "received"
    assert evit_cli.model_state(evit_cli.convert(tiny("vit_map"), layers=LAYERS, score="probe")).config.score == "probe"


def test_class_token_models_keep_class_attention_by_default():
    deit = randomize(timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY))
    assert evit_cli.model_state(evit_cli.convert(deit, layers=LAYERS)).config.score == "cls"


@pytest.mark.parametrize("score, why", [("cls", "no class token"), ("probe", "attention-pool")])
def test_scores_a_tower_cannot_take_are_refused_in_one_line(score, why):
    with pytest.raises(evit_cli.EvitError, match=why) as err:
        evit_cli.convert(tiny("vit_avg"), layers=LAYERS, score=score)
    assert "\n" not in str(err.value)


def test_max_pooling_is_refused_with_its_reason():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY, global_pool="max", class_token=False)
    with pytest.raises(evit_cli.EvitError, match="global max"):
        evit_cli.convert(model, layers=LAYERS)


@pytest.mark.parametrize("family", sorted(NAFLEX))
def test_naflexvit_towers_keep_one_and_shapes(family):
    model = randomize(timm.create_model(NAFLEX[family], pretrained=False, **TINY,
                                        pretrained_cfg_overlay={"input_size": (3, 32, 32)}))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        for score in _scores(model):
            evit = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=LAYERS, score=score)
            assert torch.equal(evit(x), dense), score
            evit_cli.convert(evit, keep_rate=RATES, layers=LAYERS, score=score)
            seen = []
            hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in evit_blocks(evit)]
            assert evit(x).shape == dense.shape
            for h in hooks:
                h.remove()
            assert seen == evit_cli.tokens_after_layers(evit)


def test_naflexvit_built_at_another_size_predicts_the_tokens_it_runs():
    """Issue 31: built at 64 px with 4 layers, the prediction follows the size it was built at."""
    model = evit_cli.convert("naflexvit_base_patch16_radio_v3", pretrained=False, img_size=64, depth=4, embed_dim=48,
                             num_heads=3, keep_rate=0.7, layers=(2, 3))
    seen = []
    for b in evit_blocks(model):
        b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    prefix = model.num_prefix_tokens
    assert evit_cli.adapters.get_adapter(model).num_tokens(model) == 16 + prefix
    assert seen == evit_cli.tokens_after_layers(model)


def test_the_score_survives_save_and_load(tmp_path):
    model = evit_cli.convert("vit_base_patch16_siglip_224", pretrained=False, **TINY, layers=LAYERS, keep_rate=0.5,
                             score="probe")
    randomize(model)
    evit_cli.save(model, tmp_path / "out")
    loaded = evit_cli.load(tmp_path / "out")
    assert evit_cli.model_state(loaded).config.score == "probe"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
