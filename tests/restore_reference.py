"""An independent, deliberately naive restore of the removed patches, written from docs/algorithm.md
("Putting the removed tokens back"), and a naive timm EViT forward that records what it needs.

One image at a time, Python dictionaries and loops: nothing here shares code with evit_cli.
"""

from __future__ import annotations

import math

import torch


def _weights(before, after, kept, j, strategy, temperature, top_k):
    """{new token index: weight} that stands for removed candidate ``j``."""
    k = len(kept)
    if strategy == "fused":
        return {k: 1.0} if after.shape[0] > k else {}
    sims = []
    for i in range(k):
        a, b = before[j], after[i]
        sims.append(float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-12) / temperature)
    allowed = sorted(range(k), key=lambda i: -sims[i])[:top_k] if top_k else range(k)
    top = max(sims[i] for i in allowed)
    exps = {i: math.exp(sims[i] - top) for i in allowed}
    total = sum(exps.values())
    return {i: e / total for i, e in exps.items()}


def naive_restore(stages, tokens, strategy, temperature=0.05, top_k=0):
    """The full grid (P, C) for one image: ``stages`` the reorganizations in order, each
    ``(before (M, C), after (k [+ 1], C), kept list)``; ``tokens`` (M_last, C) the tokens that remain
    when the grid is asked for."""
    if not stages:
        return tokens.double()
    p, c = stages[0][0].shape
    recipe = [{q: 1.0} for q in range(p)]  # patch -> {current token: weight}
    offset = [torch.zeros(c, dtype=torch.float64) for _ in range(p)]
    for before, after, kept in stages:
        before, after = before.double(), after.double()
        where = {j: i for i, j in enumerate(kept)}
        w = {j: _weights(before, after, kept, j, strategy, temperature, top_k)
             for j in range(before.shape[0]) if j not in where}
        for q in range(p):
            new = {}
            for tok, a in recipe[q].items():
                if tok in where:
                    new[where[tok]] = new.get(where[tok], 0.0) + a
                    if strategy == "delta":  # what the reorganization changed of a kept token (squeeze)
                        offset[q] = offset[q] + a * (before[tok] - after[where[tok]])
                    continue
                for i, wi in w[tok].items():
                    new[i] = new.get(i, 0.0) + a * wi
                if strategy == "delta":
                    offset[q] = offset[q] + a * (before[tok] - sum((wi * after[i] for i, wi in w[tok].items()),
                                                                    torch.zeros(c, dtype=torch.float64)))
            recipe[q] = new
    tokens = tokens.double()
    return torch.stack([offset[q] + sum((a * tokens[t] for t, a in recipe[q].items()),
                                        torch.zeros(c, dtype=torch.float64)) for q in range(p)])


def naive_timm_maps(model, image, layers, keep_rate, taps, strategy, temperature=0.05, top_k=0):
    """A timm ViT (plain blocks) with EViT at 1-based ``layers``, one image, explicit attention: the
    restored (P, C) grid after each 0-based block in ``taps`` (before timm's final norm)."""
    prefix = model.num_prefix_tokens
    x = model._pos_embed(model.patch_embed(image[None]))[0]
    stages, out = [], {}
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        n, c = x.shape
        h, d = attn.num_heads, attn.head_dim
        qkv = attn.qkv(blk.norm1(x)).reshape(n, 3, h, d)
        q, k, v = (qkv[:, s].transpose(0, 1) for s in range(3))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        x = x + attn.proj((a @ v).transpose(0, 1).reshape(n, h * d))
        if i + 1 in layers:
            m = n - prefix
            kk = math.ceil(round(keep_rate * m, 6))
            if kk < m:
                row = a[:, 0, :].mean(0)[prefix:]
                order = sorted(range(m), key=lambda j: -float(row[j]))
                keep, drop = order[:kk], order[kk:]
                toks = x[prefix:]
                fused = sum(row[j] * toks[j] for j in drop)
                after = torch.cat([toks[keep], fused[None]])
                stages.append((toks.clone(), after.clone(), keep))
                x = torch.cat([x[:prefix], after])
        x = x + blk.mlp(blk.norm2(x))
        if i in taps:
            out[i] = naive_restore(stages, x[prefix:], strategy, temperature, top_k)
    return [out[t] for t in taps]
