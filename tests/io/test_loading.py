"""Names and checkpoints -> models, safely."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY, tiny_timm
from safetensors.torch import save_file

import evit_cli
from evit_cli.io.resolve import create_timm, load_state_dict


def test_unknown_name_suggests_close_matches():
    with pytest.raises(evit_cli.EvitError, match="Did you mean deit_small_patch16_224"):
        create_timm("deit_smal_patch16_224", pretrained=False)


def test_checkpoint_in_each_format_loads(tmp_path, images):
    model = tiny_timm("vit")
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pth")  # a training checkpoint wrapping the weights
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "w.bin")  # saved from DDP
    with torch.no_grad():
        expected = model(images)
        for f in ("w.safetensors", "w.pth", "w.bin"):
            loaded = create_timm("vit_tiny_patch16_224", checkpoint=tmp_path / f, **TINY)
            assert torch.equal(loaded(images), expected), f


def test_checkpoint_head_size_sets_num_classes(tmp_path):
    sd = tiny_timm("vit").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    assert create_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "w.safetensors", **kwargs).num_classes == 10


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": payload}, f)
    with pytest.raises(evit_cli.EvitError, match="refused"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    sd = tiny_timm("vit").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(evit_cli.EvitError, match="truncated"):
        load_state_dict(tmp_path / "cut.safetensors")


def test_wrong_architecture_reports_missing_and_unexpected_keys(tmp_path):
    sd = tiny_timm("vit").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["blocks.0.norm1.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    with pytest.raises(evit_cli.EvitError, match=r"missing blocks.0.norm1.weight; unexpected extra.weight"):
        create_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "w.safetensors", **TINY)


def test_missing_checkpoint_file():
    with pytest.raises(evit_cli.EvitError, match="does not exist"):
        load_state_dict("/nonexistent/w.safetensors")


def test_unreachable_hub_fails_fast_with_advice(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "evit_cli", "convert", "deit_tiny_patch16_224", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-pretrained" in lines[0] and "--checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "o").exists()
