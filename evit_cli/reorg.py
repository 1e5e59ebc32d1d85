"""The EViT token reorganization, on tensors only (see EVIT.md).

Nothing in this file knows about a model: adapters compute the class-token
query and the keys inside their attention, and call these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_kept(m: int, keep_rate: float) -> int:
    """Number of attentive tokens kept out of ``m`` candidates: ``ceil(keep_rate * m)``.

    The product is rounded to 6 decimals first so that float noise
    (``0.7 * 100 = 70.00000000000001``) does not add a token.
    """
    return math.ceil(round(keep_rate * m, 6))


def token_counts(
    num_tokens: int, num_prefix: int, layers: list[int], keep_rates: list[float], fuse: bool = True
) -> list[int]:
    """Sequence length after each EViT layer, computed from the sizes alone.

    ``num_tokens`` is the length entering the first block (prefix included);
    ``layers`` are the EViT layers in order. Returns one length per layer.
    """
    counts = []
    n = num_tokens
    for _, rate in sorted(zip(layers, keep_rates)):
        m = n - num_prefix
        k = num_kept(m, rate)
        if k < m:
            n = num_prefix + k + (1 if fuse else 0)
        counts.append(n)
    return counts


def class_attention(q_cls: Tensor, k: Tensor, scale: float) -> Tensor:
    """Class-token row of the attention matrix, averaged over heads.

    ``q_cls``: (B, H, 1, d), the class token's queries; ``k``: (B, H, N, d).
    Returns (B, N): ``mean_h softmax(q_cls * scale @ K^T)``. Costs O(N * d) per
    head; the N x N matrix is never formed.
    """
    attn = ((q_cls * scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    return attn.mean(dim=1).squeeze(1)


def reorganize(
    x: Tensor, cls_attn: Tensor, num_prefix: int, keep_rate: float, fuse: bool = True, rank: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Keep the attentive tokens, fuse the inattentive ones into one token.

    ``x``: (B, N, C), ``num_prefix`` prefix tokens first; ``cls_attn``: (B, N)
    from :func:`class_attention`, which ranks the tokens and weights the fusion.
    ``rank`` (B, N), when given, chooses the kept tokens instead (an oracle's
    scores); the fusion weights stay ``cls_attn``. Returns the new sequence
    ``[prefix, kept, fused]`` (``[prefix, kept]`` without ``fuse``) and the
    indices, among the ``M = N - num_prefix`` candidates, of the kept tokens
    (``None`` when nothing was removed).
    """
    m = int(x.shape[1]) - num_prefix
    k = num_kept(m, keep_rate)
    if k >= m:
        return x, None
    if k < 1:
        raise ValueError(f"keep rate {keep_rate} keeps no token out of {m}")
    tokens = x[:, num_prefix:]
    attn = cls_attn[:, num_prefix:]
    scores = attn if rank is None else rank[:, num_prefix:]
    idx = scores.topk(k, dim=1, largest=True, sorted=False).indices  # (B, k)
    kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    parts = [x[:, :num_prefix], kept]
    if fuse:
        # Raw class-attention weights of the inattentive tokens (not renormalized):
        # zero the kept ones and take one weighted sum, a (B, 1, M) @ (B, M, C) product.
        weights = attn.scatter(1, idx, 0.0).to(x.dtype).unsqueeze(1)
        parts.append(weights @ tokens)
    return torch.cat(parts, dim=1), idx
