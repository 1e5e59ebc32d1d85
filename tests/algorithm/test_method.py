"""The ``squeeze`` method (``evit_cli.convert(..., method="squeeze")``) against a naive reference
written from docs/algorithm.md: one image at a time, Python lists, no batching."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_timm

import evit_cli
from evit_cli.algorithm.config import EViTConfig
from evit_cli.model.macs import count_macs


def _attention(blk, x, sizes):
    """x (N, C) of one image; every logit of key j raised by log(sizes[j]). Returns the attention output
    and the class token's ranking row, mean over heads of a_h[j] * ||v_hj||."""
    attn = blk.attn
    n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(n, 3, h, d)
    q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))  # (H, N, d)
    logits = q @ k.transpose(1, 2) / math.sqrt(d) + torch.log(torch.tensor(sizes, dtype=x.dtype))
    a = torch.softmax(logits, dim=-1)
    out = (a @ v).transpose(0, 1).reshape(n, h * d)
    score = [sum(float(a[hh, 0, j]) * float(v[hh, j].norm()) for hh in range(h)) / h for j in range(n)]
    return attn.proj(out), score


def squeeze_reference(model, images, layers, keep_rates):
    """Logits and the token count after each reorganizing layer."""
    rates = dict(zip(layers, keep_rates))
    prefix = model.num_prefix_tokens
    logits, counts = [], []
    for img in images:
        x = model._pos_embed(model.patch_embed(img[None]))[0]
        sizes = [1.0] * x.shape[0]
        seen = []
        for i, blk in enumerate(model.blocks, start=1):
            a_out, score = _attention(blk, blk.norm1(x), sizes)
            x = x + a_out
            if i in rates:
                m = x.shape[0] - prefix
                k = math.ceil(round(rates[i] * m, 6))
                if k < m:
                    order = sorted(range(m), key=lambda j: -score[prefix + j])
                    keep, rest = order[:k], order[k:]
                    toks, held = x[prefix:], sizes[prefix:]
                    total = [toks[j] * held[j] for j in keep]
                    size = [held[j] for j in keep]
                    for j in rest:  # into the kept token of largest cosine similarity
                        sims = [float(torch.nn.functional.cosine_similarity(toks[j], toks[t], dim=0)) for t in keep]
                        t = max(range(k), key=lambda s: sims[s])
                        total[t] = total[t] + toks[j] * held[j]
                        size[t] += held[j]
                    x = torch.cat([x[:prefix], torch.stack([tot / s for tot, s in zip(total, size)])], 0)
                    sizes = sizes[:prefix] + size
                seen.append(x.shape[0])
            x = x + blk.mlp(blk.norm2(x))
        logits.append(model.forward_head(model.norm(x)[None])[0])
        counts.append(seen)
    return torch.stack(logits), counts[0]


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers"])
def test_squeeze_matches_the_naive_reference(kind, images):
    layers, rates = (2, 4, 5), (0.6, 0.5, 0.5)
    model = tiny_timm(kind)
    with torch.no_grad():
        expected, counts = squeeze_reference(model, images, layers, rates)
        evit_cli.convert(model, keep_rate=rates, layers=layers, method="squeeze")
        got = model(images)
    assert (got - expected).abs().max().item() < 1e-4
    assert evit_cli.tokens_after_layers(model) == counts  # no extra token: prefix + kept


def test_squeeze_at_keep_one_is_the_original_model(images):
    with torch.no_grad():
        dense = tiny_timm("vit")(images)
        got = evit_cli.convert(tiny_timm("vit"), 1.0, (2, 4, 5), method="squeeze")(images)
    assert (got - dense).abs().max().item() < 1e-5


def test_default_method_is_the_paper_and_unchanged(images):
    with torch.no_grad():
        paper = evit_cli.convert(tiny_timm("vit"), 0.5, (2, 4))(images)
        named = evit_cli.convert(tiny_timm("vit"), 0.5, (2, 4), method="evit")(images)
        other = evit_cli.convert(tiny_timm("vit"), 0.5, (2, 4), method="squeeze")(images)
    assert torch.equal(paper, named) and (paper - other).abs().max().item() > 1e-3


def test_squeeze_macs_follow_the_token_counts():
    """One token fewer per layer than the paper's fused token, and counted MACs below it."""
    paper = evit_cli.convert(tiny_timm("vit"), 0.5, (2, 4))
    squeezed = evit_cli.convert(tiny_timm("vit"), 0.5, (2, 4), method="squeeze")
    assert [n + 1 for n in evit_cli.tokens_after_layers(squeezed)][:1] == evit_cli.tokens_after_layers(paper)[:1]
    assert count_macs(squeezed, 32) < count_macs(paper, 32)


def test_method_survives_save_and_load(images, tmp_path):
    model = evit_cli.convert(tiny_timm("vit"), 0.5, (2, 4), method="squeeze")
    with torch.no_grad():
        got = model(images)
        loaded = evit_cli.load(evit_cli.save(model, tmp_path / "m"))
        assert (loaded(images) - got).abs().max().item() < 1e-6
    assert evit_cli.model_state(loaded).config.method == "squeeze"


def test_config_dicts_without_method_are_the_paper():
    old = {"layers": [4, 7, 10], "keep_rates": [0.7, 0.7, 0.7], "fuse": True}
    assert EViTConfig.from_dict(old).method == "evit"
    assert EViTConfig.from_dict(old).to_dict() == old
    cfg = EViTConfig((4,), (0.7,), True, True, "squeeze")
    assert EViTConfig.from_dict(cfg.to_dict()) == cfg


def test_method_refusals():
    with pytest.raises(evit_cli.EvitError, match="not one of"):
        evit_cli.convert(tiny_timm("vit"), 0.5, (2,), method="tome")
    with pytest.raises(evit_cli.EvitError, match="no --no-fuse"):
        evit_cli.convert(tiny_timm("vit"), 0.5, (2,), fuse=False, method="squeeze")


def test_squeeze_is_refused_for_transformers_models():
    from transformers import ViTConfig, ViTForImageClassification

    hf = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(evit_cli.EvitError, match="timm models only"):
        evit_cli.convert(hf, 0.5, (2,), method="squeeze")
