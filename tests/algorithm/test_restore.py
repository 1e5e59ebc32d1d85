"""Putting the removed tokens back (docs/algorithm.md), checked against the naive per-image loops of
tests/restore_reference.py."""

from __future__ import annotations

import pytest
import torch
from restore_reference import naive_restore

from evit_cli.algorithm.reorg import reorganize, squeeze
from evit_cli.algorithm.restore import (
    RestoreSpec,
    removed_indices,
    restore,
    similarity_weights,
    step,
)


def test_removed_indices_are_the_complement_in_order():
    kept = torch.tensor([[4, 0, 2], [1, 3, 5]])
    assert removed_indices(kept, 6).tolist() == [[1, 3, 5], [0, 2, 4]]


def test_similarity_weights_are_a_softmax_over_cosines_and_top_k_keeps_the_most_similar():
    g = torch.Generator().manual_seed(0)
    rm, kept = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    w = similarity_weights(rm, kept, 0.1)
    for b in range(2):
        for j in range(3):
            cos = torch.tensor([float(rm[b, j] @ kept[b, i] / (rm[b, j].norm() * kept[b, i].norm())) for i in range(4)])
            assert torch.allclose(w[b, j], torch.softmax(cos / 0.1, 0), atol=1e-6)
    top = similarity_weights(rm, kept, 0.1, top_k=2)
    assert ((top > 0).sum(-1) == 2).all() and torch.allclose(top.sum(-1), torch.ones(2, 3))
    assert torch.equal(top.argmax(-1), w.argmax(-1))


def _two_stages(fuse: bool, seed: int = 0, method: str = "evit"):
    """Two reorganizations of 12 candidates (keep 0.5, then 0.6 of what remains), and the tokens
    after some later change: what the restore is asked about. ``method="squeeze"``: the kept tokens
    absorb the others (they change in the reorganization)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 13, 6, generator=g)  # one prefix token, 12 patches
    stages, sizes = [], None
    for rate in (0.5, 0.6):
        attn = torch.rand(2, x.shape[1], generator=g)
        if method == "squeeze":
            new, kept, sizes = squeeze(x, attn, 1, rate, sizes)
        else:
            new, kept = reorganize(x, attn, 1, rate, fuse=fuse)
        stages.append((x[:, 1:], new[:, 1:], kept))
        x = new + 0.3 * torch.randn(new.shape, generator=g)  # the blocks in between change every token
    return stages, x[:, 1:]


@pytest.mark.parametrize("strategy", ["fused", "reconstruct", "delta"])
@pytest.mark.parametrize("fuse", [True, False])
def test_step_and_restore_equal_the_naive_loop(strategy, fuse):
    stages, tokens = _two_stages(fuse)
    spec = RestoreSpec(strategy, temperature=0.2)
    state = None
    for before, after, kept in stages:
        state = step(state, before, after, kept, spec)
    grid = restore(tokens, state)
    assert grid.shape == (2, 12, 6)
    for b in range(2):
        expected = naive_restore([(bf[b], af[b], k[b].tolist()) for bf, af, k in stages], tokens[b], strategy, 0.2)
        assert torch.allclose(grid[b].double(), expected, atol=1e-5), (strategy, fuse, b)


@pytest.mark.parametrize("strategy", ["reconstruct", "delta"])
def test_after_the_squeeze_method_step_and_restore_equal_the_naive_loop(strategy):
    stages, tokens = _two_stages(False, method="squeeze")
    assert not torch.allclose(stages[0][1], stages[0][0].gather(1, stages[0][2][..., None].expand(-1, -1, 6)))
    state = None
    for before, after, kept in stages:
        state = step(state, before, after, kept, RestoreSpec(strategy, temperature=0.2), kept_changed=True)
    for b in range(2):
        expected = naive_restore([(bf[b], af[b], k[b].tolist()) for bf, af, k in stages], tokens[b], strategy, 0.2)
        assert torch.allclose(restore(tokens, state)[b].double(), expected, atol=1e-5), (strategy, b)
    if strategy == "delta":  # right after the first step, every patch is exactly its token again
        first = step(None, *stages[0], RestoreSpec("delta"), kept_changed=True)
        assert torch.allclose(restore(stages[0][1], first), stages[0][0], atol=1e-5)


def test_top_k_restore_equals_the_naive_loop():
    stages, tokens = _two_stages(True, seed=1)
    spec = RestoreSpec("delta", temperature=0.1, top_k=2)
    state = None
    for before, after, kept in stages:
        state = step(state, before, after, kept, spec)
    for b in range(2):
        expected = naive_restore([(bf[b], af[b], k[b].tolist()) for bf, af, k in stages], tokens[b], "delta", 0.1, 2)
        assert torch.allclose(restore(tokens, state)[b].double(), expected, atol=1e-5)


def test_the_delta_restore_gives_each_removed_token_its_value_when_nothing_changed():
    stages, _ = _two_stages(True)
    before, after, kept = stages[0]
    state = step(None, before, after, kept, RestoreSpec("delta"))
    assert torch.allclose(restore(after, state), before, atol=1e-5)  # right after the step: exactly the tokens


def test_nothing_removed_is_the_identity_and_a_kept_patch_is_its_token():
    y = torch.randn(2, 5, 3)
    assert restore(y, None) is y
    stages, tokens = _two_stages(True)
    state = None
    for before, after, kept in stages:
        state = step(state, before, after, kept, RestoreSpec("fused"))
    grid = restore(tokens, state)
    for b in range(2):  # a patch kept twice holds its token; every other one a fused token
        first, second = stages[0][2][b].tolist(), stages[1][2][b].tolist()
        for j, i in enumerate(second):
            if i < len(first):
                assert torch.equal(grid[b, first[i]], tokens[b, j])


def test_a_bad_spec_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        RestoreSpec("nearest")
    with pytest.raises(ValueError, match="temperature"):
        RestoreSpec("delta", temperature=0.0)
