"""How a timm ViT without a class token pools its tokens, and EViT's faithful version of that pool.

A tower without a class token pools the tokens of its last block: a global average
(``global_pool="avg"``) or an attention-pooling probe (``"map"``, timm's ``AttentionPoolLatent``).
After EViT a fused token stands for several patches (the score-weighted mean of them), so the
average weighs each token by the patches it holds, and the probe adds ``log(size)`` to its logit for
each token (it sees a fused token as it would see that many copies of it). Nothing is removed at keep
1.0: the model's own pool runs, unchanged. The ``"probe"`` score ranks the tokens of a block by the
probe's own query against the keys the probe would compute from them (the final norm and the probe's
key projection applied to the block's tokens).
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from timm.models.eva import Eva
from torch import Tensor, nn

from ...algorithm.reorg import probe_attention, size_bias, weighted_mean

POOLS = {"avg": "global average", "max": "global max", "avgmax": "global average and max",
         "map": "attention pool (MAP)", "prr": "attention pool (PRR)", "": "no pooling at all",
         "token": "class token"}


def pool_kind(model: nn.Module) -> str:
    """``"token"``, ``"avg"``, ``"map"`` (an ``AttentionPoolLatent``), ``"prr"`` or another timm pool name."""
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        return "map" if isinstance(attn_pool, AttentionPoolLatent) else "prr"
    return str(getattr(model, "global_pool", "token"))


def includes_prefix(model: nn.Module) -> bool:
    """Whether the pool reads the prefix (register) tokens too (EVA's probe always does)."""
    return isinstance(model, Eva) and getattr(model, "attn_pool", None) is not None or \
        bool(getattr(model, "pool_include_prefix", False))


def pool_refusal(model: nn.Module) -> str | None:
    """Why EViT cannot pool this class-token-free model faithfully (None: it can)."""
    kind = pool_kind(model)
    if kind not in ("avg", "map"):
        return (f"pools by {POOLS.get(kind, repr(kind))}, which no token weighting can keep faithful after fusing "
                "(EViT serves global-average and attention-pool (MAP) towers)")
    if kind == "map" and model.attn_pool.pos_embed is not None:
        return "attention pool has position embeddings of its own (a fixed number of tokens)"
    return None


def pooled(model: nn.Module, x: Tensor, sizes: Tensor, num_prefix: int) -> Tensor:
    """The model's pool of ``x`` (B, P + M, C), each token weighted by the patches it holds ``sizes``
    (B, P + M; prefix 1): the size-weighted average, or the probe with ``log(size)`` on its logits."""
    if not includes_prefix(model):
        x, sizes = x[:, num_prefix:], sizes[:, num_prefix:]
    if pool_kind(model) == "map":
        return model.attn_pool(x, attn_mask=size_bias(sizes, 0).to(x.dtype))
    return weighted_mean(x, sizes)


def probe(model: nn.Module, num_prefix: int):
    """The ``"probe"`` score of a MAP model: ``x`` (B, N, C) of any block -> (B, N), the probe's row over
    the tokens it pools (prefix tokens 0 where it pools the patches only)."""
    pool: AttentionPoolLatent = model.attn_pool
    prefix = 0 if includes_prefix(model) else num_prefix

    def row(x: Tensor, sizes: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        t = model.norm(x)[:, prefix:]
        kv_bias = pool.kv.bias[: pool.kv.out_features // 2] if pool.kv.bias is not None else None
        k = F.linear(t, pool.kv.weight[: pool.kv.out_features // 2], kv_bias)
        k = pool.k_norm(k.reshape(B, N - prefix, pool.num_heads, pool.head_dim).transpose(1, 2))
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim)
        q = pool.q_norm(q.transpose(1, 2))
        bias = size_bias(sizes[:, prefix:], 0).to(x.dtype) if sizes is not None else None
        r = probe_attention(q, k, pool.scale, bias)
        return F.pad(r, (prefix, 0))

    return row
