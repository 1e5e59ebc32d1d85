"""Tiny random models, built in milliseconds, shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from evit_cli.io.resolve import create_timm  # noqa: E402

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so that no token ties and no output is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_timm(kind: str = "vit", seed: int = 0, **overrides):
    """A 6-block ViT on 32 px images with 64 patches: 'vit', 'distilled' or 'registers'."""
    kwargs = dict(TINY, **overrides)
    if kind == "vit":
        name = "vit_tiny_patch16_224"
    elif kind == "distilled":
        name = "deit_tiny_distilled_patch16_224"
    elif kind == "registers":
        name, kwargs = "vit_tiny_patch16_224", dict(kwargs, reg_tokens=4)
    else:
        raise ValueError(kind)
    return randomize(create_timm(name, pretrained=False, **kwargs), seed)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
