"""The class-token-free scores and pooling of algorithm/reorg.py against naive loops over the equations of
docs/algorithm.md (one image, one head, one token at a time)."""

from __future__ import annotations

import math

import torch

from evit_cli.algorithm.config import EViTConfig
from evit_cli.algorithm.reorg import (
    mean_query_attention,
    probe_attention,
    received_attention,
    reorganize,
    score_row,
    weighted_mean,
)

B, H, N, D = 2, 3, 7, 4


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _qk(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)


def test_mean_query_row_is_the_softmax_of_the_mean_query():
    q, k = _qk()
    sizes = torch.tensor([[1.0, 2, 1, 3, 1, 1, 5], [1.0] * N])
    scale = D ** -0.5
    got = mean_query_attention(q, k, scale, weights=sizes)
    for b in range(B):
        total = [0.0] * N
        w = [float(s) for s in sizes[b]]
        for h in range(H):
            qm = [sum(w[i] * float(q[b, h, i, c]) for i in range(N)) / sum(w) for c in range(D)]
            row = _softmax([_dot(qm, k[b, h, j]) * scale for j in range(N)])
            total = [t + r / H for t, r in zip(total, row)]
        torch.testing.assert_close(got[b], torch.tensor(total), atol=1e-5, rtol=1e-5)


def test_mean_query_row_averages_the_bias_rows():
    q, k = _qk(1)
    bias = torch.randn(1, H, N, N)
    got = mean_query_attention(q, k, 0.5, bias)
    qm = q.mean(2, keepdim=True)
    want = ((qm * 0.5) @ k.transpose(-2, -1) + bias.mean(2, keepdim=True)).softmax(-1).squeeze(2).mean(1)
    torch.testing.assert_close(got, want)


def test_received_attention_is_the_column_mean_of_the_attention_matrix():
    q, k = _qk(2)
    scale = D ** -0.5
    got = received_attention(q, k, scale)
    for b in range(B):
        total = [0.0] * N
        for h in range(H):
            for i in range(N):
                row = _softmax([_dot(q[b, h, i], k[b, h, j]) * scale for j in range(N)])
                total = [t + r / (H * N) for t, r in zip(total, row)]
        torch.testing.assert_close(got[b], torch.tensor(total), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(B))


def test_probe_attention_averages_its_queries_and_heads():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, H, 2, D, generator=g), torch.randn(B, H, N, D, generator=g)
    got = probe_attention(q, k, 0.5)
    for b in range(B):
        rows = [_softmax([_dot(q[b, h, i], k[b, h, j]) * 0.5 for j in range(N)]) for h in range(H) for i in range(2)]
        torch.testing.assert_close(got[b], torch.tensor([sum(r[j] for r in rows) / len(rows) for j in range(N)]),
                                   atol=1e-6, rtol=1e-5)


def test_score_row_cls_is_the_first_row():
    q, k = _qk(4)
    want = ((q[:, :, :1] * 0.5) @ k.transpose(-2, -1)).softmax(-1).squeeze(2).mean(1)
    torch.testing.assert_close(score_row("cls", q, k, 0.5), want)


def test_mean_fusion_is_the_weighted_mean_of_the_inattentive_tokens():
    g = torch.Generator().manual_seed(5)
    x, a = torch.randn(1, 6, 3, generator=g), torch.rand(1, 6, generator=g)
    out, idx = reorganize(x, a, 1, 0.5, mean=True)  # 5 candidates: 3 kept, 2 fused
    kept = set(idx[0].tolist())
    drop = [j for j in range(5) if j not in kept]
    want = sum(float(a[0, 1 + j]) * x[0, 1 + j] for j in drop) / sum(float(a[0, 1 + j]) for j in drop)
    torch.testing.assert_close(out[0, -1], want)


def test_weighted_mean_counts_each_token_as_its_patches():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])
    torch.testing.assert_close(weighted_mean(x, torch.tensor([[1.0, 3.0]])), torch.tensor([[2.5, 1.5]]))


def test_the_score_round_trips_through_the_config_dict():
    cfg = EViTConfig((4, 7), (0.7, 0.7), score="received")
    assert cfg.to_dict()["score"] == "received"
    assert EViTConfig.from_dict(cfg.to_dict()) == cfg
    assert "score" not in EViTConfig((4,), (0.7,)).to_dict()  # as older exports wrote it
    assert EViTConfig.from_dict({"layers": [4], "keep_rates": [0.7]}).score == "cls"
