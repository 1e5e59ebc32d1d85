"""The hub round trip, offline: an exported folder laid out as huggingface_hub's cache holds a
downloaded repository (models--org--name/snapshots/<rev>/, refs/main) is read by evit_cli.load,
`evit info` and, without evit, by transformers' remote code; --push-to-hub uploads the code too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_timm
from test_remote_code import run_without_evit
from test_transformers_families import _build

import evit_cli
from evit_cli import adapters
from evit_cli.errors import EvitError
from evit_cli.io import folder as artifact
from evit_cli.io import hub

REV = "0123456789abcdef0123456789abcdef01234567"


def _cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Lay ``folder`` out as the hub cache holds ``repo_id`` at revision REV."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return repo / "snapshots" / REV


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _exported_vit(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model, _ = _build("vit", "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    return evit_cli.save(model, tmp_path / "export"), model


def test_load_reads_an_exported_repository_from_the_hub_cache(hub_cache, tmp_path):
    folder, model = _exported_vit(tmp_path)
    _cache(folder, hub_cache, "someone/vit-evit")
    shutil.rmtree(folder)  # only the cache holds it now
    x = torch.randn(2, 3, 32, 32)
    for back in (evit_cli.load("someone/vit-evit"), evit_cli.load_model("someone/vit-evit")):
        assert evit_cli.tokens_after_layers(back) == [34, 19]
        with torch.no_grad():
            assert (back(x).logits - model(x).logits).abs().max() < 1e-5


def test_a_timm_export_on_the_hub_loads_too(hub_cache, tmp_path):
    model = tiny_timm("vit")
    evit_cli.convert(model, keep_rate=0.6, layers=(3,))
    for name, layout in (("timm-evit", None), ("timm-wrapped", "transformers")):
        _cache(artifact.save(model, tmp_path / name, layout=layout), hub_cache, f"someone/{name}")
        back = evit_cli.load(f"someone/{name}")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(back(x), model(x))


def test_evit_info_reads_a_hub_id(hub_cache, tmp_path, capsys):
    from evit_cli.cli import main

    folder, _ = _exported_vit(tmp_path)
    _cache(folder, hub_cache, "someone/vit-evit")
    with pytest.raises(SystemExit) as e:
        main(["info", "someone/vit-evit", "--json"])
    assert e.value.code in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [2, 4] and info["tokens"] == [65, 34, 19]
    assert info["folder"].endswith(REV)


def test_a_hub_id_not_in_the_cache_is_one_line_offline(hub_cache, capsys):
    from evit_cli.cli import main

    with pytest.raises(EvitError, match="is in the local Hugging Face cache \\(the hub cannot be reached\\)"):
        evit_cli.load("someone/absent")
    with pytest.raises(SystemExit) as e:
        main(["info", "someone/absent"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "someone/absent" in err


def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path):
    """No offline flag, and a hub that refuses connections: the probe gives up at once and says so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "evit_cli", "info", "someone/vit-evit"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot be reached" in proc.stderr


def test_transformers_loads_the_cached_repository_with_its_code_without_evit(hub_cache, tmp_path):
    """What a colleague without evit runs on the pushed repository: the code files come from the repo too."""
    folder, model = _exported_vit(tmp_path)
    _cache(folder, hub_cache, "someone/vit-evit")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save({"x": x, "ref": adapters.get_adapter(model).outputs(model, x)}, tmp_path / "refs.pt")
    out = run_without_evit('''
        import json
        from transformers import AutoModelForImageClassification
        data = torch.load("refs.pt")
        m = AutoModelForImageClassification.from_pretrained("someone/vit-evit", trust_remote_code=True).eval()
        print(json.dumps({"class": type(m).__name__, "diff": (output(m, data["x"]) - data["ref"]).abs().max().item()}))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["class"] == "EvitViTForImageClassification" and result["diff"] < 1e-5


def test_push_to_hub_uploads_the_modeling_code(tmp_path, monkeypatch):
    """The upload is the whole folder; what huggingface_hub would send is read from the folder it is given."""
    folder, _ = _exported_vit(tmp_path)
    sent = {}

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            sent["repo"] = repo_id

        def upload_folder(self, folder_path, repo_id, commit_message, **kw):
            sent["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            sent["patterns"] = kw

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    hub.push_to_hub(folder, "someone/vit-evit")
    assert sent["repo"] == "someone/vit-evit" and not sent["patterns"]  # nothing filtered out
    config = json.loads((folder / "config.json").read_text())
    module = config["auto_map"]["AutoModelForImageClassification"].split(".")[0]
    assert {f"{module}.py", "evit_algorithm_reorg.py", "model.safetensors"} <= set(sent["files"])
