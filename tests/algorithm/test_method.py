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


class Timm:
    """A timm ViT seen one image at a time: embedding, per block (norm, q/k/v, projection, MLP), head."""

    def __init__(self, model):
        self.model, self.prefix, self.blocks = model, model.num_prefix_tokens, list(model.blocks)

    def embed(self, img):
        return self.model._pos_embed(self.model.patch_embed(img[None]))[0]

    def qkv(self, blk, x):
        n, heads = x.shape[0], blk.attn.num_heads
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(n, 3, heads, -1)
        return [qkv[:, i].transpose(0, 1) for i in range(3)]  # (H, N, d) each

    def proj(self, blk, out):
        return blk.attn.proj(out)

    def mlp(self, blk, x):
        return blk.mlp(blk.norm2(x))

    def head(self, x):
        return self.model.forward_head(self.model.norm(x)[None])[0]


class HfViT(Timm):
    """transformers' ViTForImageClassification, the same way."""

    def __init__(self, model):
        self.model, self.prefix, self.blocks = model, 1, list(model.vit.layers)

    def embed(self, img):
        return self.model.vit.embeddings(img[None])[0]

    def qkv(self, blk, x):
        a, h = blk.attention, blk.layernorm_before(x)
        heads = self.model.config.num_attention_heads
        return [lin(h).reshape(x.shape[0], heads, -1).transpose(0, 1) for lin in (a.q_proj, a.k_proj, a.v_proj)]

    def proj(self, blk, out):
        return blk.attention.o_proj(out)

    def mlp(self, blk, x):
        return blk.mlp(blk.layernorm_after(x))

    def head(self, x):
        return self.model.classifier(self.model.vit.layernorm(x)[0])


def _attention(view, blk, x, sizes):
    """x (N, C) of one image; every logit of key j raised by log(sizes[j]). Returns the attention output
    and the class token's ranking row, mean over heads of a_h[j] * ||v_hj||."""
    q, k, v = view.qkv(blk, x)
    h, n, d = q.shape
    logits = q @ k.transpose(1, 2) / math.sqrt(d) + torch.log(torch.tensor(sizes, dtype=x.dtype))
    a = torch.softmax(logits, dim=-1)
    out = (a @ v).transpose(0, 1).reshape(n, h * d)
    score = [sum(float(a[hh, 0, j]) * float(v[hh, j].norm()) for hh in range(h)) / h for j in range(n)]
    return view.proj(blk, out), score


def _squeeze_one(x, sizes, score, prefix, rate):
    """One image's squeeze step on lists: the new tokens and sizes."""
    m = x.shape[0] - prefix
    k = math.ceil(round(rate * m, 6))
    if k >= m:
        return x, sizes
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
    return torch.cat([x[:prefix], torch.stack([tot / s for tot, s in zip(total, size)])], 0), sizes[:prefix] + size


def squeeze_reference(view, images, layers, keep_rates):
    """Logits and the token count after each reorganizing layer."""
    rates = dict(zip(layers, keep_rates))
    logits, counts = [], []
    for img in images:
        x = view.embed(img)
        sizes = [1.0] * x.shape[0]
        seen = []
        for i, blk in enumerate(view.blocks, start=1):
            a_out, score = _attention(view, blk, x, sizes)
            x = x + a_out
            if i in rates:
                x, sizes = _squeeze_one(x, sizes, score, view.prefix, rates[i])
                seen.append(x.shape[0])
            x = x + view.mlp(blk, x)
        logits.append(view.head(x))
        counts.append(seen)
    return torch.stack(logits), counts[0]


def tiny_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                    intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers"])
def test_squeeze_matches_the_naive_reference(kind, images):
    layers, rates = (2, 4, 5), (0.6, 0.5, 0.5)
    model = tiny_timm(kind)
    with torch.no_grad():
        expected, counts = squeeze_reference(Timm(model), images, layers, rates)
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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_squeeze_matches_the_naive_reference(attn, images):
    layers, rates = (2, 4, 5), (0.6, 0.5, 0.5)
    model = tiny_hf_vit()
    model.config._attn_implementation = attn
    with torch.no_grad():
        expected, counts = squeeze_reference(HfViT(model), images, layers, rates)
        evit_cli.convert(model, keep_rate=rates, layers=layers, method="squeeze")
        got = model(pixel_values=images).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert evit_cli.tokens_after_layers(model) == counts


def test_transformers_squeeze_at_keep_one_is_the_original_model(images):
    with torch.no_grad():
        dense = tiny_hf_vit()(pixel_values=images).logits
        got = evit_cli.convert(tiny_hf_vit(), 1.0, (2, 4, 5), method="squeeze")(pixel_values=images).logits
    assert (got - dense).abs().max().item() < 1e-5


def test_squeeze_intermediates_give_the_remaining_tokens_and_full_maps(images):
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2, 4), method="squeeze")
    with torch.no_grad():
        nlc = model.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        maps = model.forward_intermediates(images, intermediates_only=True)
        final = model.forward_features(images)
    assert [t.shape[1] for t in nlc] == [64, 32, 32, 16, 16, 16]  # no fused token
    assert all(m.shape[-2:] == (8, 8) for m in maps) and final.shape[1] == 1 + 16
