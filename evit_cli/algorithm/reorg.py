"""The EViT token reorganization, on tensors only (see docs/algorithm.md).

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


def class_attention(
    q_cls: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, v: Tensor | None = None
) -> Tensor:
    """Class-token row of the attention matrix, averaged over heads.

    ``q_cls``: (B, H, 1, d), the class token's queries; ``k``: (B, H, N, d);
    ``bias``, when the attention adds one (relative-position bias), its class
    row, broadcastable to (B, H, 1, N). Returns (B, N):
    ``mean_h softmax(q_cls * scale @ K^T + bias)``. Costs O(N * d) per head;
    the N x N matrix is never formed.

    ``v`` (B, H, N, d), when given (the ``squeeze`` method's ranking), weighs
    each head's row by the norms of that head's values before the mean:
    ``mean_h a_h[j] * ||v_hj||``, what token ``j`` adds to the class token's
    output rather than only how much it is looked at. Also O(N * d).
    """
    logits = (q_cls * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    rows = logits.float().softmax(dim=-1)  # (B, H, R, N), R = 1 but for models pooling several class tokens
    if v is not None:
        rows = rows * v.float().norm(dim=-1).unsqueeze(2)
    rows = rows.mean(dim=1)
    # not squeeze(1) on several rows (a no-op in PyTorch): ONNX's Squeeze fails on a dimension that is not 1
    return rows[:, 0] if rows.shape[1] == 1 else rows


def mean_query_attention(
    q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, v: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """The attention row of the mean query, averaged over heads: no class token needed.

    ``q``, ``k``: (B, H, N, d). The query is ``mean_i q_i`` over the ``N`` tokens (weighted by
    ``weights`` (B, N), the patches each token holds, when given); its row is
    ``softmax(mean(q) * scale @ K^T + mean_i bias_i)`` per head (``bias`` (b, H, N, N) or any shape
    broadcastable to it, its rows averaged alike). Returns (B, N), the mean over heads (``v``: weighed
    by the value norms, as :func:`class_attention`). O(N * d) per head, like the class row.
    """
    if weights is None:
        q_mean = q.mean(dim=2, keepdim=True)
    else:
        w = (weights / weights.sum(dim=1, keepdim=True)).to(q.dtype)[:, None, :, None]  # (B, 1, N, 1)
        q_mean = (q * w).sum(dim=2, keepdim=True)
    row_bias = bias.mean(dim=-2, keepdim=True) if bias is not None and bias.shape[-2] > 1 else bias
    return class_attention(q_mean, k, scale, row_bias, v)


def received_attention(
    q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, v: Tensor | None = None,
    queries: Tensor | None = None,
) -> Tensor:
    """The attention each token receives, averaged over all queries and heads: no class token needed.

    ``q``, ``k``: (B, H, N, d); ``bias`` broadcastable to (B, H, N, N). Returns (B, N):
    ``mean_h mean_i softmax(q_i * scale @ K^T + bias_i)``, the column means of the attention
    matrix (``v``: each head's weighed by its value norms). O(N^2 * d) per head: the N x N matrix
    is formed, one head at a time. ``queries`` (B, N) 0/1, when given, averages over the queries marked 1
    only (the valid tokens of a padded sequence; its ``bias`` masks the padded keys).
    """
    total = q.new_zeros(q.shape[0], k.shape[2], dtype=torch.float32)
    w = None if queries is None else (queries.float() / queries.float().sum(dim=1, keepdim=True))[:, :, None]
    for h in range(q.shape[1]):
        logits = (q[:, h] * scale) @ k[:, h].transpose(-2, -1)  # (B, N, N)
        if bias is not None:
            logits = logits + bias[:, min(h, bias.shape[1] - 1)]
        rows = logits.float().softmax(dim=-1)
        col = rows.mean(dim=1) if w is None else (rows * w).sum(dim=1)  # (B, N)
        total = total + (col * v[:, h].float().norm(dim=-1) if v is not None else col)
    return total / q.shape[1]


def probe_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """An attention-pooling head's own ranking: the rows of its ``L`` latent queries ``q`` (B, H, L, d)
    over the keys ``k`` (B, H, N, d) it computes from the tokens (``bias``: added to the logits, e.g.
    :func:`size_bias`), averaged over heads and queries (B, N). O(N * d) per head and query."""
    rows = class_attention(q, k, scale, bias)
    return rows.mean(dim=1) if rows.dim() == 3 else rows


def score_row(score: str, q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None, v: Tensor | None = None,
              weights: Tensor | None = None, queries: Tensor | None = None) -> Tensor:
    """The ranking row (B, N) of ``score`` (config.SCORES; not ``"probe"``, which the pooling head computes
    from its own query, :func:`class_attention` of that query): ``"cls"`` the class token's row (token 0),
    ``"mean_query"`` :func:`mean_query_attention`, ``"received"`` :func:`received_attention`.
    ``q``, ``k``, ``v``: (B, H, N, d); ``bias``: the block's additive attention bias (b, H, N, N); ``queries``: the
    valid queries of a padded sequence, which ``"received"`` averages over."""
    if score == "cls":
        return class_attention(q[:, :, :1], k, scale, bias[:, :, :1] if bias is not None else None, v)
    if score == "mean_query":
        return mean_query_attention(q, k, scale, bias, v, weights)
    if score == "received":
        return received_attention(q, k, scale, bias, v, queries)
    raise ValueError(f"no ranking row for score {score!r}")


def _to_keep(m: int, keep_rate: float) -> int | None:
    """How many of ``m`` candidates a block keeps; ``None`` when it keeps them all."""
    k = num_kept(m, keep_rate)
    if k >= m:
        return None
    if k < 1:
        raise ValueError(f"keep rate {keep_rate} keeps no token out of {m}")
    return k


def reorganize(
    x: Tensor, cls_attn: Tensor, num_prefix: int, keep_rate: float, fuse: bool = True, rank: Tensor | None = None,
    mean: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Keep the attentive tokens, fuse the inattentive ones into one token.

    ``x``: (B, N, C), ``num_prefix`` prefix tokens first; ``cls_attn``: (B, N)
    from :func:`class_attention`, which ranks the tokens and weights the fusion.
    ``rank`` (B, N), when given, chooses the kept tokens instead (an oracle's
    scores); the fusion weights stay ``cls_attn``. Returns the new sequence
    ``[prefix, kept, fused]`` (``[prefix, kept]`` without ``fuse``) and the
    indices, among the ``M = N - num_prefix`` candidates, of the kept tokens
    (``None`` when nothing was removed). ``mean``: the fused token is the weighted mean
    ``sum a_i x_i / sum a_i`` of the inattentive tokens instead of their raw weighted sum (the
    class-token-free scores: the token then stands for its patches, and a pool weighs it by their count).
    """
    k = _to_keep(int(x.shape[1]) - num_prefix, keep_rate)
    if k is None:
        return x, None
    tokens = x[:, num_prefix:]
    attn = cls_attn[:, num_prefix:]
    scores = attn if rank is None else rank[:, num_prefix:]
    idx = scores.topk(k, dim=1, largest=True, sorted=False).indices  # (B, k)
    kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    parts = [x[:, :num_prefix], kept]
    if fuse:
        # Raw class-attention weights of the inattentive tokens (not renormalized):
        # zero the kept ones and take one weighted sum, a (B, 1, M) @ (B, M, C) product.
        weights = attn.scatter(1, idx, 0.0)
        if mean:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
        parts.append(weights.to(x.dtype).unsqueeze(1) @ tokens)
    return torch.cat(parts, dim=1), idx


def reorganize_padded(
    x: Tensor, score: Tensor, sizes: Tensor, num_prefix: int, keep_rate: float, fuse: bool = True,
    rank: Tensor | None = None, mean: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`reorganize` on a padded batch (SigLIP 2): image ``b`` keeps ``k_b = ceil(keep_rate * M_b)`` of its
    own ``M_b`` valid candidates and fuses the rest of them; a padded token is never ranked, kept or fused.

    ``sizes`` (B, M): the patches each candidate holds, 0 for a padded one (the mask); ``score`` (B, N) ranks and
    weighs as in :func:`reorganize`. Image ``b``'s kept tokens fill the first ``k_b`` of ``K = max_b k_b`` slots,
    best first; its slots from ``k_b`` on hold tokens it fused (or padding) and get size 0: masked like padding.
    The fused token comes last, its size the patches it fused (0, masked, where the image fused none). Returns
    ``[prefix, kept (K), fused]`` (no fused token without ``fuse``), the kept indices (B, K) among the candidates
    and the new sizes; ``(x, None, sizes)`` when no image removes a token.
    """
    valid = sizes > 0
    m = [int(v) for v in valid.sum(dim=1).tolist()]  # data-dependent: the keep counts follow each image
    ks = [num_kept(mb, keep_rate) for mb in m]
    if all(k >= mb for k, mb in zip(ks, m)):
        return x, None, sizes
    if min(ks) < 1:
        raise ValueError(f"keep rate {keep_rate} keeps no token out of {min(m)}")
    tokens, attn = x[:, num_prefix:], score[:, num_prefix:]
    order = (attn if rank is None else rank[:, num_prefix:]).masked_fill(~valid, float("-inf"))
    idx = order.topk(max(ks), dim=1, largest=True, sorted=True).indices  # (B, K): each image's best first
    slot_kept = torch.arange(idx.shape[1], device=x.device)[None, :] < torch.tensor(ks, device=x.device)[:, None]
    attentive = torch.zeros_like(valid).scatter(1, idx, slot_kept)
    parts = [x[:, :num_prefix], tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))]
    new_sizes = sizes.gather(1, idx) * slot_kept
    if fuse:
        rest = valid & ~attentive
        weights = torch.where(rest, attn, torch.zeros_like(attn))
        if mean:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
        parts.append(weights.to(x.dtype).unsqueeze(1) @ tokens)
        new_sizes = torch.cat([new_sizes, (sizes * rest).sum(dim=1, keepdim=True)], dim=1)
    return torch.cat(parts, dim=1), idx, new_sizes


def squeeze(
    x: Tensor, score: Tensor, num_prefix: int, keep_rate: float, sizes: Tensor | None = None,
    rank: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The ``squeeze`` method: keep the top tokens, squeeze every other one into its most similar kept token.

    ``x``: (B, N, C), ``num_prefix`` prefix tokens first; ``score`` (B, N)
    ranks the candidates (``rank``, when given, ranks instead). ``sizes``
    (B, M): the patches each candidate holds (``None``: one each). The ``k``
    top candidates are kept; each of the ``M - k`` others goes to the kept
    token whose residual ``x`` has the largest cosine similarity with its own,
    and every kept token becomes the size-weighted average of itself and what
    it received: ``x_i <- (s_i x_i + sum_{j -> i} s_j x_j) / (s_i + sum_{j -> i} s_j)``.
    Returns ``[prefix, kept]`` (``P + k`` tokens, no extra token), the kept
    indices among the candidates (``None`` when nothing was removed) and the
    kept tokens' new sizes (B, k). The similarity is a (B, M - k, k) product
    over the ``C`` channels.
    """
    k = _to_keep(int(x.shape[1]) - num_prefix, keep_rate)
    if k is None:
        return x, None, sizes
    bsz, _, c = x.shape
    tokens = x[:, num_prefix:]
    scores = (score if rank is None else rank)[:, num_prefix:]
    order = scores.argsort(dim=1, descending=True)
    idx, rest = order[:, :k], order[:, k:]  # kept (B, k) and squeezed (B, M - k)

    def rows(t: Tensor, i: Tensor) -> Tensor:
        return t.gather(1, i[..., None].expand(-1, -1, c))

    kept, rest_x = rows(tokens, idx), rows(tokens, rest)
    unit = kept / kept.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # the largest cosine over the kept tokens: a squeezed token's own norm does not change which one
    target = (rest_x @ unit.transpose(1, 2)).argmax(dim=-1)  # (B, M - k)
    flat = (target + torch.arange(bsz, device=x.device)[:, None] * k).flatten()  # into (B * k) rows
    if sizes is None:  # one patch each: a plain mean
        kept_s, rest_s = torch.ones(bsz, k, device=x.device, dtype=x.dtype), None
    else:
        sizes = sizes.to(x.dtype)
        kept_s, rest_s = sizes.gather(1, idx), sizes.gather(1, rest)
        kept, rest_x = kept * kept_s[..., None], rest_x * rest_s[..., None]
    total = kept.reshape(bsz * k, c).index_add(0, flat, rest_x.reshape(-1, c)).view(bsz, k, c)
    added = torch.ones(flat.shape, device=x.device, dtype=x.dtype) if rest_s is None else rest_s.flatten()
    new_s = kept_s.flatten().index_add(0, flat, added).view(bsz, k)
    return torch.cat([x[:, :num_prefix], total / new_s[..., None]], dim=1), idx, new_s


# ---------------------------------------------------------------- position terms
# RoPE and relative-position bias belong to token positions. After a
# reorganization, each later block must use the terms of the tokens that remain.
# ``pos`` (B, M) holds, per image, the original patch index of each non-prefix
# token, and -1 for a fused token, which has no position: RoPE leaves it
# unrotated (like the prefix tokens) and a relative-position bias gives it a
# zero row and column.


def follow_positions(pos: Tensor | None, kept: Tensor, m: int, fuse: bool) -> Tensor:
    """Positions after a reorganization that kept ``kept`` (B, k) of ``m`` candidates.

    ``pos`` is the positions before it (``None``: the identity, patch ``i`` at
    ``i``). The result is ``[pos[kept], -1]`` (``[pos[kept]]`` without fusion).
    """
    if pos is None:
        pos = torch.arange(m, device=kept.device).expand(kept.shape[0], m)
    new = pos.gather(1, kept)
    if fuse:
        new = torch.cat([new, new.new_full((new.shape[0], 1), -1)], dim=1)
    return new


def follow_sizes(sizes: Tensor | None, kept: Tensor, m: int, fuse: bool) -> Tensor:
    """Patches held by each non-prefix token after a reorganization that kept ``kept`` (B, k) of
    ``m`` candidates: ``[sizes[kept], the sum of the rest]`` (``sizes`` None: one patch each)."""
    if sizes is None:
        sizes = torch.ones(kept.shape[0], m, device=kept.device)
    new = sizes.gather(1, kept)
    if fuse:
        new = torch.cat([new, (sizes.sum(1) - new.sum(1)).unsqueeze(1)], dim=1)
    return new


def size_bias(sizes: Tensor, num_prefix: int) -> Tensor:
    """Proportional attention (ToMe's, for EViT's fused token): the additive bias (B, 1, 1, P + M)
    that raises every query's logit for a token by the log of the patches it holds (prefix: 0)."""
    logs = torch.cat([sizes.new_zeros(sizes.shape[0], num_prefix), sizes.log()], dim=1)
    return logs[:, None, None, :]


def weighted_mean(x: Tensor, sizes: Tensor) -> Tensor:
    """Global average pooling of tokens that stand for several patches: ``sum_j n_j x_j / sum_j n_j``
    for ``x`` (B, N, C) and ``sizes`` (B, N) the patches each token holds (one each: the plain mean)."""
    s = sizes.to(x.dtype)
    return (x * s[..., None]).sum(dim=1) / s.sum(dim=1, keepdim=True)


def gather_rope(rope: Tensor, pos: Tensor) -> Tensor:
    """The rotary embedding rows (sin and cos concatenated, tokens on dim -2) of ``pos``.

    ``rope``: (N, D), (h, N, D) or (b, h, N, D) for the ``N`` patch positions.
    Returns (B, h, M, D); a fused token (-1) gets sin 0 and cos 1, no rotation.
    """
    while rope.dim() < 4:
        rope = rope.unsqueeze(0)
    b, h, n, d = rope.shape
    identity = torch.cat([rope.new_zeros(d // 2), rope.new_ones(d - d // 2)])
    rope = torch.cat([rope, identity.expand(b, h, 1, d)], dim=2)
    idx = torch.where(pos < 0, n, pos)
    bsz, m = idx.shape
    rope = rope.expand(bsz, h, n + 1, d)
    return rope.gather(2, idx[:, None, :, None].expand(bsz, h, m, d))


def gather_bias(bias: Tensor, pos: Tensor, num_prefix: int) -> Tensor:
    """The rows and columns of an additive attention bias for the tokens that remain.

    ``bias``: (b, H, P + N, P + N) over the ``P`` prefix tokens and ``N``
    patches; ``pos`` (B, M). Returns (B, H, P + M, P + M); a fused token (-1)
    gets a zero row and column.
    """
    b, h, n, _ = bias.shape
    bias = torch.nn.functional.pad(bias, (0, 1, 0, 1))  # index n: the zero row / column
    bsz, m = pos.shape
    prefix = torch.arange(num_prefix, device=pos.device).expand(bsz, num_prefix)
    idx = torch.cat([prefix, torch.where(pos < 0, n, pos + num_prefix)], dim=1)  # (B, P + M)
    rows = bias.expand(bsz, h, n + 1, n + 1).gather(2, idx[:, None, :, None].expand(bsz, h, idx.shape[1], n + 1))
    return rows.gather(3, idx[:, None, None, :].expand(bsz, h, idx.shape[1], idx.shape[1]))
