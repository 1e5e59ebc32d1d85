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
