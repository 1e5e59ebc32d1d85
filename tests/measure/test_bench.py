"""Counting: MACs and token counts against docs/algorithm.md and against a formula."""

from __future__ import annotations

import pytest
from conftest import tiny_timm

import evit_cli
from evit_cli.io.resolve import create_timm
from evit_cli.measure.bench import measure_tokens
from evit_cli.model.macs import count_macs


def vit_macs(num_patches, patch, dim, depth, classes, prefix, evit_layers):
    """Hand count for a timm ViT (mlp ratio 4): ``evit_layers`` maps a 1-based layer to tokens after it."""
    n = num_patches + prefix
    total = num_patches * 3 * patch * patch * dim  # patch embedding
    for layer in range(1, depth + 1):
        total += n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim  # qkv, QK^T and AV, proj
        if layer in evit_layers:
            m = n - prefix
            total += n * dim + m * dim  # class-attention row, weighted fusion
            n = evit_layers[layer]
        total += 2 * n * dim * 4 * dim  # FFN
    return total + dim * classes


def test_deit_small_counts_match_the_paper():
    model = create_timm("deit_small_patch16_224", pretrained=False)
    dense = count_macs(model, 224) / 1e9
    evit_cli.convert(model, keep_rate=0.7, layers=(4, 7, 10))
    assert measure_tokens(model, 224) == [140, 100, 72]
    evit = count_macs(model, 224) / 1e9
    assert dense == pytest.approx(4.60, rel=0.01)
    assert evit == pytest.approx(3.03, rel=0.02)


@pytest.mark.parametrize("kind, prefix", [("vit", 1), ("distilled", 2)])
def test_counted_macs_equal_hand_count(kind, prefix):
    model = evit_cli.convert(tiny_timm(kind), keep_rate=0.6, layers=(2, 5))
    tokens = measure_tokens(model, 32)
    expected = vit_macs(64, 4, 48, 6, 10, prefix, dict(zip((2, 5), tokens)))
    if kind == "distilled":
        expected += 48 * 10  # the distillation head
    assert count_macs(model, 32) == expected


def test_library_bench_reports_both_models():
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2,))
    r = evit_cli.bench(model, batch=2, reps=2, warmup=0)
    assert r["evit_model"]["tokens"] == [65, 34]
    assert r["mac_ratio"] == pytest.approx(r["dense"]["gmacs"] / r["evit_model"]["gmacs"])
    assert r["speedup"] > 0 and r["speedup_b1"] > 0
    assert r["precision"] == "fp32, eager"
    for m in ("dense", "evit_model"):
        assert r[m]["images_per_s"] == pytest.approx(2 / (r[m]["latency"]["median_ms"] / 1000))


def test_bench_reports_attention_kernels_training_and_compiled_figures():
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2,))
    r = evit_cli.bench(model, batch=2, reps=1, warmup=0, train=True)
    # both models keep the fused kernel for every block's output; no N x N softmax anywhere
    for key in ("dense", "evit_model"):
        kernels = r[key]["attention_kernels"]
        assert sum(kernels.values()) == 6 and not any(k.startswith("math") for k in kernels)
    t = r["training"]
    assert t["speedup"] == pytest.approx(t["evit_model"]["images_per_s"] / t["dense"]["images_per_s"])
    assert all(p.grad is None for p in model.parameters())  # training ran on copies


def test_attention_kernels_see_the_math_path():
    import torch

    from evit_cli.measure.bench import attention_kernels

    model = tiny_timm("vit")
    for blk in model.blocks:
        blk.attn.fused_attn = False
    kernels = attention_kernels(model, torch.randn(1, 3, 32, 32))
    assert kernels == {"math (explicit N x N softmax)": 6}


def test_bench_compiled_figures_beside_eager(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "compile", lambda m, mode=None: m)  # the timing path, not the compiler
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2,))
    r = evit_cli.bench(model, batch=2, reps=1, warmup=0, compile="reduce-overhead")
    assert r["compiled"]["mode"] == "reduce-overhead"
    assert r["precision"] == "fp32, eager and torch.compile (mode reduce-overhead)"
    assert set(r["compiled"]["evit_model"]) == {"latency", "images_per_s", "latency_b1"}
    with pytest.raises(evit_cli.EvitError, match="compile mode"):
        evit_cli.bench(model, batch=2, reps=1, warmup=0, compile="fastest")


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_paths_choose_the_amp_dtype_and_synchronise(monkeypatch, bf16):
    """The CUDA branches of the timing code, exercised on the CPU: AMP dtype, its name in the
    report, and synchronisation. bf16 wherever the device has it, fp16 on older GPUs only."""
    import importlib

    import torch

    bench_mod = importlib.import_module("evit_cli.measure.bench")  # evit_cli.measure.bench is also the function
    device_mod = importlib.import_module("evit_cli.utils.device")

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d))
    device_mod.synchronize(torch.device("cuda", 0))
    device_mod.synchronize(torch.device("cpu"))
    assert calls == [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    seen = {}
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: seen.setdefault(device_type, dtype))
    device_mod.autocast(torch.device("cuda"), True)
    device_mod.autocast(torch.device("cpu"), True)
    assert seen == {"cuda": torch.bfloat16 if bf16 else torch.float16, "cpu": torch.bfloat16}
    gpu = "bf16" if bf16 else "fp16"
    assert bench_mod.precision(torch.device("cuda"), True, None) == f"{gpu} autocast, eager"
    assert bench_mod.precision(torch.device("cpu"), True,
                               "default") == "bf16 autocast, eager and torch.compile (mode default)"
    assert bench_mod.precision(torch.device("cuda"), False, None) == "fp32, eager"


def test_bench_refuses_cuda_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.5, layers=(2,))
    with pytest.raises(evit_cli.EvitError, match="no CUDA GPU"):
        evit_cli.bench(model, batch=2, reps=1, device="cuda")
