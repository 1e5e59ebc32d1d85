"""The algorithm of docs/algorithm.md, checked against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_timm
from reference import reference_forward
from torch.utils._python_dispatch import TorchDispatchMode

import evit_cli
from evit_cli.algorithm.reorg import class_attention, num_kept, reorganize, token_counts


def test_num_kept_is_ceil_without_float_noise():
    assert num_kept(196, 0.7) == 138  # ceil(137.2)
    assert num_kept(100, 0.7) == 70  # 0.7 * 100 = 70.00000000000001 in floats
    assert num_kept(139, 0.7) == 98
    assert num_kept(10, 1.0) == 10


def test_token_counts_for_deit_small_follow_evit_md():
    # docs/algorithm.md: 197 -> 140 (1 + 138 + 1) -> 100 (1 + 98 + 1) -> 72 (1 + 70 + 1)
    assert token_counts(197, 1, [4, 7, 10], [0.7] * 3) == [140, 100, 72]
    # without fusion: no extra token
    assert token_counts(197, 1, [4, 7, 10], [0.7] * 3, fuse=False) == [139, 98, 69]


def test_class_attention_equals_row_of_full_matrix():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    full = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, dim=-1)
    expected = full[:, :, 0, :].mean(1)
    assert torch.allclose(class_attention(q[:, :, :1], k, 8 ** -0.5), expected, atol=1e-6)


def test_reorganize_keeps_topk_and_fuses_the_rest_with_raw_weights():
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    attn = torch.tensor([[0.5, 0.1, 0.05, 0.2, 0.1, 0.05], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    out, idx = reorganize(x, attn, num_prefix=1, keep_rate=0.4, fuse=True)  # M=5, k=2
    assert out.shape == (2, 1 + 2 + 1, 2)
    # image 0: candidates' attention 0.1, 0.05, 0.2, 0.1, 0.05 -> keep tokens 3 and (1 or 4): tie at 0.1
    assert torch.equal(out[:, 0], x[:, 0])
    assert 3 in (idx[0] + 1).tolist()
    kept = set((idx[0] + 1).tolist())
    dropped = [i for i in range(1, 6) if i not in kept]
    expected_fused = sum(attn[0, i] * x[0, i] for i in dropped)
    assert torch.allclose(out[0, -1], expected_fused)
    dropped_only, _ = reorganize(x, attn, num_prefix=1, keep_rate=0.4, fuse=False)
    assert dropped_only.shape == (2, 3, 2)


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers"])
def test_keep_rate_one_reproduces_the_original_model(kind, images):
    dense = tiny_timm(kind)
    with torch.no_grad():
        expected = dense(images)
        model = evit_cli.convert(tiny_timm(kind), keep_rate=1.0, layers=(2, 4, 5))
        got = model(images)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("rates", [(0.7, 0.7, 0.7), (0.9, 0.6, 0.5)])
def test_evit_matches_independent_reference(kind, fuse, rates, images):
    layers = (2, 4, 5)
    model = tiny_timm(kind)
    with torch.no_grad():
        expected, counts = reference_forward(model, images, layers, rates, fuse)
        evit_cli.convert(model, keep_rate=",".join(map(str, rates)), layers=",".join(map(str, layers)), fuse=fuse)
        got = model(images)
    assert (got - expected).abs().max().item() < 1e-4
    assert evit_cli.tokens_after_layers(model) == counts


@pytest.mark.parametrize("kind", ["distilled", "registers"])
def test_prefix_tokens_are_never_ranked_or_fused(kind, images):
    model = evit_cli.convert(tiny_timm(kind), keep_rate=0.25, layers=(2,))
    prefix = model.num_prefix_tokens
    assert prefix > 1
    seen = {}
    hook = model.blocks[1].register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        model(images)
        hook.remove()
        # a dense block on the same input: attention and FFN are per-token after mixing,
        # so every prefix row must come out exactly as the dense block makes it
        dense_out = evit_cli.dense_copy(model).blocks[1](seen["inp"])
    assert seen["out"].shape[1] == prefix + math.ceil(0.25 * 64) + 1
    assert torch.allclose(seen["out"][:, :prefix], dense_out[:, :prefix], atol=1e-5)


class _ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.softmax_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "softmax" in str(func):
            self.softmax_shapes.append(tuple(out.shape))
        return out


def test_class_row_is_computed_without_the_full_attention_matrix(images):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 4))
    assert all(b.attn.fused_attn for b in model.blocks)
    log = _ShapeLog()
    with log, torch.no_grad():
        model(images)
    # one class-row softmax per EViT block, each over (B, H, 1, N): never N x N
    assert len(log.softmax_shapes) == 2
    assert all(s[-2] == 1 for s in log.softmax_shapes)


def test_unfused_attention_path_matches_fused(images):
    fused = evit_cli.convert(tiny_timm("vit"), keep_rate=0.6, layers=(2, 4))
    plain = evit_cli.convert(tiny_timm("vit"), keep_rate=0.6, layers=(2, 4))
    for b in plain.blocks:
        b.attn.fused_attn = False
    with torch.no_grad():
        assert (fused(images) - plain(images)).abs().max().item() < 1e-5


def test_model_without_class_token_pooling_by_max_is_refused():
    model = tiny_timm("vit", class_token=False, global_pool="max")
    with pytest.raises(evit_cli.EvitError, match="no class token and pools by global max"):
        evit_cli.convert(model, keep_rate=0.7, layers=(2,))


def test_revert_gives_back_the_dense_model(images):
    dense = tiny_timm("vit")
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(1, 3))
    evit_cli.revert(model)
    with torch.no_grad():
        assert torch.equal(model(images), dense(images))


@pytest.mark.parametrize("kind", ["vit", "registers"])
def test_proportional_attention_matches_independent_reference(kind, images, tmp_path):
    """Each token's attention logit raised by the log of the patches it holds (a Python list in
    the reference); it changes the output, survives save/load, and keep 1.0 is the dense model."""
    layers, rates = (2, 4, 5), (0.6, 0.5, 0.5)
    model = tiny_timm(kind)
    with torch.no_grad():
        expected, counts = reference_forward(model, images, layers, rates, proportional=True)
        plain, _ = reference_forward(model, images, layers, rates)
        evit_cli.convert(model, keep_rate=rates, layers=layers, proportional_attention=True)
        got = model(images)
        loaded = evit_cli.load(evit_cli.save(model, tmp_path / "m"))(images)
        dense = evit_cli.convert(tiny_timm(kind), 1.0, layers, proportional_attention=True)(images)
    assert (got - expected).abs().max().item() < 1e-4 and (got - plain).abs().max().item() > 1e-3
    assert (loaded - got).abs().max().item() < 1e-6
    assert evit_cli.model_state(evit_cli.load(tmp_path / "m")).config.proportional
    assert (dense - tiny_timm(kind)(images)).abs().max().item() < 1e-5


def test_proportional_attention_is_refused_where_it_cannot_apply():
    with pytest.raises(evit_cli.EvitError, match="needs fusing"):
        evit_cli.convert(tiny_timm("vit"), 0.5, (2,), fuse=False, proportional_attention=True)

