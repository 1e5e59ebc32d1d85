"""EViT inside Hugging Face transformers ViT/DeiT, hub layouts and the offline hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial

import pytest
import torch
from conftest import randomize, tiny_timm
from safetensors.torch import save_file
from transformers import (
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import evit_cli

HF_TINY = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=6, num_attention_heads=3,
               intermediate_size=192, layer_norm_eps=1e-6, hidden_act="gelu")


def map_timm_embeddings(sd: dict, prefix: str) -> dict:
    """timm's class token, positions, patch embedding and final norm under transformers' ``prefix`` keys."""
    return {
        f"{prefix}.embeddings.cls_token": sd["cls_token"],
        f"{prefix}.embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}.layernorm.weight": sd["norm.weight"],
        f"{prefix}.layernorm.bias": sd["norm.bias"],
    }


def map_timm_blocks(sd: dict, layers: str, names, qkv: tuple[str, str, str], key_bias: bool = True) -> dict:
    """timm's blocks under ``layers.{i}``: ``names`` maps timm modules to theirs, ``qkv`` names the split
    projections (without ``key_bias`` the key gets no bias)."""
    out, i = {}, 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, h = f"blocks.{i}", f"{layers}.{i}"
        for t, n in names:
            out[f"{h}.{n}.weight"], out[f"{h}.{n}.bias"] = sd[f"{b}.{t}.weight"], sd[f"{b}.{t}.bias"]
        for part, w, bias in zip(qkv, sd[f"{b}.attn.qkv.weight"].chunk(3), sd[f"{b}.attn.qkv.bias"].chunk(3)):
            out[f"{h}.{part}.weight"] = w
            if key_bias or part != qkv[1]:
                out[f"{h}.{part}.bias"] = bias
        i += 1
    return out


def timm_to_hf(sd: dict, prefix: str, distilled: bool) -> dict:
    """Map a timm ViT/DeiT state dict onto transformers' keys, independently of evit_cli."""
    names = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.o_proj"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    qkv = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    out = {**map_timm_embeddings(sd, prefix), **map_timm_blocks(sd, f"{prefix}.layers", names, qkv)}
    if distilled:
        out[f"{prefix}.embeddings.distillation_token"] = sd["dist_token"]
        out["cls_classifier.weight"], out["cls_classifier.bias"] = sd["head.weight"], sd["head.bias"]
        out["distillation_classifier.weight"], out["distillation_classifier.bias"] = (sd["head_dist.weight"],
                                                                                      sd["head_dist.bias"])
    else:
        out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def hf_twin(kind: str, attn: str):
    """The transformers model with the same weights as tiny_timm(kind)."""
    timm_model = tiny_timm(kind)
    if kind == "vit":
        hf = ViTForImageClassification(ViTConfig(**HF_TINY, num_labels=10, attn_implementation=attn))
        sd = timm_to_hf(timm_model.state_dict(), "vit", False)
    else:
        hf = DeiTForImageClassificationWithTeacher(DeiTConfig(**HF_TINY, num_labels=10, attn_implementation=attn))
        sd = timm_to_hf(timm_model.state_dict(), "deit", True)
    hf.load_state_dict(sd, strict=True)
    return timm_model, hf.eval()


@pytest.mark.parametrize("how", [{}, {"method": "squeeze"}, {"proportional_attention": True}])
@pytest.mark.parametrize("kind", ["vit", "distilled"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_weights_in_timm_and_transformers_give_same_evit_output(kind, attn, how, images):
    timm_model, hf = hf_twin(kind, attn)
    with torch.no_grad():
        assert (hf(images).logits - timm_model(images)).abs().max() < 1e-4  # the twins agree dense
        evit_cli.convert(timm_model, keep_rate="0.8,0.6,0.5", layers="2,4,5", **how)
        evit_cli.convert(hf, keep_rate="0.8,0.6,0.5", layers="2,4,5", **how)
        assert hf.config._attn_implementation == attn
        assert (hf(images).logits - timm_model(images)).abs().max() < 1e-4
    assert evit_cli.tokens_after_layers(hf) == evit_cli.tokens_after_layers(timm_model)


@pytest.mark.parametrize("cls, cfg_cls", [(ViTForImageClassification, ViTConfig),
                                          (DeiTForImageClassificationWithTeacher, DeiTConfig),
                                          (ViTModel, ViTConfig),
                                          (Data2VecVisionForImageClassification,  # the older layout, per-layer bias
                                           partial(Data2VecVisionConfig, use_relative_position_bias=True))])
def test_save_pretrained_folder_converts_and_exports(cls, cfg_cls, tmp_path, images):
    torch.manual_seed(0)
    model = randomize(cls(cfg_cls(**HF_TINY, num_labels=10)))
    model.save_pretrained(tmp_path / "src")
    out = lambda m: m(images).last_hidden_state if cls is ViTModel else m(images).logits  # noqa: E731
    with torch.no_grad():
        expected = out(model)
        same = evit_cli.convert(tmp_path / "src", keep_rate=1.0, layers=(2, 4, 5))
        assert (out(same) - expected).abs().max() < 1e-5
        evit = evit_cli.convert(tmp_path / "src", keep_rate=0.7, layers=(2, 4, 5))
        prefix = 2 if cfg_cls is DeiTConfig else 1
        # docs/algorithm.md: [prefix, ceil(0.7 M), fused] with M = 64 patches, then 46/47, ...
        m1 = 64
        n1 = prefix + -(-7 * m1 // 10) + 1
        assert evit_cli.tokens_after_layers(evit)[0] == n1
        before = out(evit)
        evit_cli.save(evit, tmp_path / "exp")
        after = out(evit_cli.load(tmp_path / "exp"))
    assert torch.equal(before, after)
    files = {p.name for p in (tmp_path / "exp").iterdir()}
    assert {"config.json", "model.safetensors", "evit.json", "README.md"} <= files
    # transformers reads the folder back as the dense model with the same weights
    dense = cls.from_pretrained(tmp_path / "exp").eval()
    with torch.no_grad():
        assert (out(dense) - expected).abs().max() < 1e-5
    assert "0.7" in (tmp_path / "exp" / "README.md").read_text()


def _fake_cache(home, repo: str, files: dict):
    """Files laid out as huggingface-hub's cache keeps a downloaded repo."""
    sha = "0" * 40
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    for name, writer in files.items():
        writer(snap / name)


def _run_cli(args, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "evit_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_offline_hub_ids_load_from_cache_and_fail_fast_otherwise(tmp_path):
    home = tmp_path / "hf"
    torch.manual_seed(0)
    hf = ViTForImageClassification(ViTConfig(**HF_TINY, num_labels=10))
    hf.save_pretrained(tmp_path / "saved")
    _fake_cache(home, "acme/tiny-vit", {
        "config.json": lambda p: p.write_bytes((tmp_path / "saved" / "config.json").read_bytes()),
        "model.safetensors": lambda p: p.write_bytes((tmp_path / "saved" / "model.safetensors").read_bytes()),
    })
    timm_model = tiny_timm("vit")
    timm_cfg = {"architecture": "vit_tiny_patch16_224", "num_classes": 10,
                "model_args": {k: v
                               for k, v in dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3).items()}}
    _fake_cache(home, "timm/tiny-vit", {
        "config.json": lambda p: p.write_text(json.dumps(timm_cfg)),
        "model.safetensors": lambda p: save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, p),
    })
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    for repo, out in (("acme/tiny-vit", "a"), ("hf-hub:timm/tiny-vit", "b")):
        proc = _run_cli(["convert", repo, "-l", "2,4", "-o", tmp_path / out, "--json"], env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tokens"] == [65, 47, 35]
    loaded = evit_cli.load(tmp_path / "b")
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(evit_cli.dense_copy(loaded)(x), timm_model(x))  # weights came from the cache
    t0 = time.time()
    proc = _run_cli(["convert", "acme/not-cached", "-o", tmp_path / "c"], env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "acme/not-cached" in proc.stderr
    assert time.time() - t0 < 60 and not (tmp_path / "c").exists()


def test_push_to_hub_without_network_keeps_the_export(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    model = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2,))
    evit_cli.save(model, tmp_path / "m")
    proc = _run_cli(["convert", tmp_path / "m", "-o", tmp_path / "out", "--push-to-hub", "acme/evit-tiny"], env)
    assert proc.returncode == 2
    assert "cannot be reached" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert evit_cli.tokens_after_layers(evit_cli.load(tmp_path / "out")) == [1 + 45 + 1]


def test_non_vit_transformers_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(evit_cli.EvitError, match="BertModel.*does not support yet"):
        evit_cli.load_model(tmp_path / "bert")


def test_local_bin_checkpoint_for_a_transformers_architecture(tmp_path, images):
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**HF_TINY, num_labels=10)).save_pretrained(tmp_path / "arch")
    trained = randomize(ViTForImageClassification(ViTConfig(**HF_TINY, num_labels=10)), seed=7)
    torch.save(trained.state_dict(), tmp_path / "pytorch_model.bin")
    model = evit_cli.load_model(tmp_path / "arch", checkpoint=tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        assert torch.equal(model(images).logits, trained(images).logits)


def test_offline_dataset_name_is_a_one_line_error(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    model = evit_cli.save(evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2,)), tmp_path / "m")
    proc = _run_cli(["eval", model, "--dataset", "acme/no-such-data"], env)
    assert proc.returncode == 2 and "acme/no-such-data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
