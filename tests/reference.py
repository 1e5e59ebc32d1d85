"""An independent, deliberately naive EViT forward for timm ViTs, written from docs/algorithm.md.

Per image, per head, with the explicit N x N attention matrix and Python-level
sorting: nothing here shares code with evit_cli.
"""

from __future__ import annotations

import math

import torch


def _attention(blk, x, sizes=None):
    """x: (N, C) for one image. Returns (attention output (N, C), attention matrix (H, N, N)).
    ``sizes`` (N,): proportional attention, every logit of key j raised by log(sizes[j])."""
    attn = blk.attn
    n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(n, 3, h, d)
    q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)  # (H, N, d)
    logits = q @ k.transpose(1, 2) / math.sqrt(d)
    if sizes is not None:
        logits = logits + torch.log(torch.tensor(sizes, dtype=logits.dtype))
    a = torch.softmax(logits, dim=-1)
    out = (a @ v).transpose(0, 1).reshape(n, h * d)
    return attn.proj(out), a


def reference_forward(model, images, layers, keep_rates, fuse=True, proportional=False):
    """Logits and the token count after each EViT layer (1-based ``layers``); ``proportional``:
    proportional attention, each token's patch count kept in a Python list."""
    rates = dict(zip(layers, keep_rates))
    prefix = model.num_prefix_tokens
    logits, counts = [], []
    for img in images:
        x = model._pos_embed(model.patch_embed(img[None]))[0]
        seen = []
        sizes = [1.0] * x.shape[0]
        for i, blk in enumerate(model.blocks, start=1):
            a_out, a = _attention(blk, blk.norm1(x), sizes if proportional else None)
            x = x + a_out
            if i in rates:
                m = x.shape[0] - prefix
                k = math.ceil(round(rates[i] * m, 6))
                if k < m:
                    cls_row = a[:, 0, :].mean(0)[prefix:]  # mean over heads, candidates only
                    order = sorted(range(m), key=lambda j: -float(cls_row[j]))
                    keep, drop = order[:k], order[k:]
                    toks = x[prefix:]
                    new = [x[:prefix], toks[keep]]
                    if fuse:
                        fused = sum(cls_row[j] * toks[j] for j in drop)
                        new.append(fused[None])
                    x = torch.cat(new, 0)
                    held = sizes[prefix:]
                    sizes = sizes[:prefix] + [held[j] for j in keep] + ([sum(held[j] for j in drop)] if fuse else [])
                seen.append(x.shape[0])
            x = x + blk.mlp(blk.norm2(x))
        x = model.norm(x)
        logits.append(model.forward_head(x[None])[0])
        counts.append(seen)
    return torch.stack(logits), counts[0]


def _qkv(blk, x):
    attn = blk.attn
    n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(n, 3, h, d)
    return [t.transpose(0, 1) for t in (qkv[:, 0], qkv[:, 1], qkv[:, 2])]  # (H, N, d) each


def _free_row(score, blk, model, x, sizes, prefix):
    """The ranking row (N,) of a class-token-free score, from the equations of docs/algorithm.md, one head
    at a time with explicit softmaxes."""
    q, k, _ = _qkv(blk, blk.norm1(x))
    h, n, d = q.shape
    if score == "mean_query":
        w = torch.tensor(sizes, dtype=q.dtype)
        rows = [torch.softmax((sum(w[i] * q[hh, i] for i in range(n)) / w.sum()) @ k[hh].T / math.sqrt(d), -1)
                for hh in range(h)]
        return sum(rows) / h
    if score == "received":
        return sum(torch.softmax(q[hh] @ k[hh].T / math.sqrt(d), -1).mean(0) for hh in range(h)) / h
    raise ValueError(score)


def _probe_row(model, x, sizes, prefix):
    """The MAP probe's own row over the tokens it pools, as its forward would compute it (zeros for prefix)."""
    pool = model.attn_pool
    t = model.norm(x)[prefix:]
    c = t.shape[-1]
    kk = (t @ pool.kv.weight[:c].T + pool.kv.bias[:c]).reshape(len(t), pool.num_heads, -1).transpose(0, 1)
    q = pool.q(pool.latent[0]).reshape(-1, pool.num_heads, pool.head_dim).transpose(0, 1)  # (H, L, d)
    logs = torch.log(torch.tensor(sizes[prefix:], dtype=t.dtype))
    row = sum(torch.softmax(q[hh] @ kk[hh].T * pool.scale + logs, -1).mean(0) for hh in range(pool.num_heads))
    return torch.cat([torch.zeros(prefix), row / pool.num_heads])


def _naive_map(model, x, sizes):
    """timm's AttentionPoolLatent, written out, with log(size) added to each token's logit."""
    pool = model.attn_pool
    n, c = x.shape
    kv = (x @ pool.kv.weight.T + pool.kv.bias).reshape(n, 2, pool.num_heads, -1)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
    q = pool.q(pool.latent[0]).reshape(-1, pool.num_heads, pool.head_dim).transpose(0, 1)
    a = torch.softmax(q @ k.transpose(1, 2) * pool.scale + torch.log(torch.tensor(sizes, dtype=x.dtype)), -1)
    out = pool.proj((a @ v).transpose(0, 1).reshape(-1, c))
    out = out + pool.mlp(pool.norm(out))
    return out.mean(0) if pool.pool == "avg" else out[0]


def reference_free_forward(model, images, layers, keep_rates, score):
    """Output of a timm ViT without a class token (global average or MAP pool; or a class-token ViT whose
    head reads its class token) after EViT with a class-token-free ``score``: the score-weighted mean is
    fused, every token remembers how many patches it holds, and the pool weighs each token by them
    (average: weights; MAP: log(size) on its logits)."""
    rates = dict(zip(layers, keep_rates))
    prefix = model.num_prefix_tokens
    outs = []
    for img in images:
        x = model._pos_embed(model.patch_embed(img[None]))[0]
        sizes = [1.0] * x.shape[0]
        for i, blk in enumerate(model.blocks, start=1):
            row = None
            if i in rates and score != "probe":
                row = _free_row(score, blk, model, x, sizes, prefix)
            x = x + _attention(blk, blk.norm1(x))[0]
            if i in rates:
                if score == "probe":
                    row = _probe_row(model, x, sizes, prefix)
                m = x.shape[0] - prefix
                k = math.ceil(round(rates[i] * m, 6))
                if k < m:
                    cand = row[prefix:]
                    order = sorted(range(m), key=lambda j: -float(cand[j]))
                    keep, drop = order[:k], order[k:]
                    toks = x[prefix:]
                    fused = sum(cand[j] * toks[j] for j in drop) / sum(cand[j] for j in drop)
                    x = torch.cat([x[:prefix], toks[keep], fused[None]], 0)
                    held = sizes[prefix:]
                    sizes = sizes[:prefix] + [held[j] for j in keep] + [sum(held[j] for j in drop)]
            x = x + blk.mlp(blk.norm2(x))
        x = model.norm(x)
        if model.global_pool == "token":  # a class token present but not read for ranking: the head reads it
            outs.append(model.head(model.fc_norm(x[0])))
            continue
        x = x[prefix:]
        if model.attn_pool is not None:
            pooled = _naive_map(model, x, sizes[prefix:])
        else:
            w = torch.tensor(sizes[prefix:], dtype=x.dtype)
            pooled = (x * w[:, None]).sum(0) / w.sum()
        outs.append(model.head(model.fc_norm(pooled)))
    return torch.stack(outs)
