"""Exported folders carry their modeling code: transformers' API gives the EViT model in a process
that cannot import evit_cli, equal to evit_cli.load; without trust_remote_code, the dense model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_timm
from test_transformers_families import FAMILIES, _build

import evit_cli
from evit_cli import adapters
from evit_cli.errors import EvitError
from evit_cli.io import bundle
from evit_cli.io import folder as artifact
from evit_cli.model.convert import dense_copy

ROOT = Path(__file__).resolve().parents[2]
REAL = next((p for p in (ROOT.parent / "shared" / "real", Path("/work/shared/real")) if p.is_dir()), None)

# Run in the child: evit_cli cannot be imported there (a meta-path finder refuses it), which the
# child proves before it loads anything.
BLOCK_EVIT = textwrap.dedent('''
    import sys

    class _NoEvit:
        def find_spec(self, name, path=None, target=None):
            if name == "evit_cli" or name.startswith("evit_cli."):
                raise ImportError("evit_cli is not installed here")

    sys.meta_path.insert(0, _NoEvit())
    try:
        import evit_cli
    except ImportError:
        pass
    else:
        raise SystemExit("evit_cli could be imported")
''')

# The tensor a user takes from a transformers model, computed without evit.
OUTPUT = textwrap.dedent('''
    import torch

    def output(model, x):
        with torch.no_grad():
            if hasattr(model, "get_image_features") and hasattr(model, "text_model"):
                out = model.get_image_features(pixel_values=x)
            else:
                out = model(x)
        if isinstance(out, torch.Tensor):
            return out
        for attr in ("logits", "image_embeds", "pooler_output"):
            if getattr(out, attr, None) is not None:
                return out[attr]
        return out.last_hidden_state[:, 0]
''')


def run_without_evit(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh python that cannot import evit_cli; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", BLOCK_EVIT + OUTPUT + textwrap.dedent(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _reference(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """evit_cli.load's output on ``x``, and its dense copy's."""
    model = evit_cli.load(folder)
    adapter = adapters.get_adapter(model)
    with torch.no_grad():
        return adapter.outputs(model, x), adapter.outputs(dense_copy(model), x)


def _compare_in_child(folders: dict[str, Path], x: torch.Tensor, tmp_path: Path) -> dict:
    """Load each folder through transformers without evit (with and without remote code); max
    differences to evit_cli.load's outputs and to the dense ones."""
    refs = {}
    for name, folder in folders.items():
        evit_out, dense_out = _reference(folder, x)
        refs[name] = {"folder": str(folder), "evit": evit_out, "dense": dense_out,
                      "auto": json.loads((folder / artifact.META_FILE).read_text())["auto_class"]}
    torch.save({"x": x, "refs": refs}, tmp_path / "refs.pt")
    out = run_without_evit('''
        import json
        import transformers
        data = torch.load("refs.pt")
        result = {}
        for name, r in data["refs"].items():
            auto = getattr(transformers, r["auto"])
            remote = auto.from_pretrained(r["folder"], trust_remote_code=True).eval()
            plain = auto.from_pretrained(r["folder"])  # without trust_remote_code: transformers' own class
            dense = type(remote).__mro__[1].from_pretrained(r["folder"]).eval()
            result[name] = {"class": type(remote).__name__, "dense_class": type(dense).__name__,
                            "plain_module": type(plain).__module__,
                            "module": type(remote).__module__,
                            "evit": (output(remote, data["x"]) - r["evit"]).abs().max().item(),
                            "dense": (output(dense, data["x"]) - r["dense"]).abs().max().item(),
                            "dense_vs_evit": (r["dense"] - r["evit"]).abs().max().item()}
        print(json.dumps(result))
    ''', tmp_path)
    return json.loads(out.strip().splitlines()[-1])


SQUEEZED = ("vit", "dinov2_reg_cls", "beit")  # the squeeze method: plain, registers, relative-position bias


def _export_families(names, tmp_path: Path) -> dict[str, Path]:
    folders = {}
    for name in names:
        model, _ = _build(name, "sdpa")
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
        folders[name] = evit_cli.save(model, tmp_path / name)
    for name in SQUEEZED:
        model, _ = _build(name, "sdpa")
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4), method="squeeze")
        folders[f"{name}_squeeze"] = evit_cli.save(model, tmp_path / f"{name}_squeeze")
    return folders


def test_every_transformers_family_loads_as_evit_without_evit_installed(tmp_path):
    folders = _export_families(FAMILIES, tmp_path)
    result = _compare_in_child(folders, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), tmp_path)
    assert set(result) == set(FAMILIES) | {f"{n}_squeeze" for n in SQUEEZED}
    for name, r in result.items():
        assert r["module"].startswith("transformers_modules."), (name, r)  # the folder's code, not a package's
        assert r["class"].startswith("Evit") and r["dense_class"] == r["class"][len("Evit"):], (name, r)
        assert r["evit"] < 1e-5, (name, r)
        assert r["plain_module"].startswith("transformers.models."), (name, r)
        assert r["dense"] < 1e-5, (name, r)  # transformers' class on the folder: the dense model, same weights
        assert r["dense_vs_evit"] > 1e-3, (name, r)  # so the two checks above tell the models apart


def test_a_timm_model_in_the_timmwrapper_layout_loads_through_transformers_without_evit(tmp_path):
    folders = {}
    for kind in ("vit", "distilled"):
        model = tiny_timm(kind)
        evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
        folders[kind] = artifact.save(model, tmp_path / kind, layout="transformers")
    headless = tiny_timm("vit", num_classes=0)
    evit_cli.convert(headless, keep_rate=0.6, layers=(3,), fuse=False)
    folders["headless"] = artifact.save(headless, tmp_path / "headless", layout="transformers")
    squeezed = evit_cli.convert(tiny_timm("vit"), keep_rate=0.7, layers=(2, 3, 4, 5), method="squeeze")
    folders["squeeze"] = artifact.save(squeezed, tmp_path / "squeeze", layout="transformers")
    config = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert config["model_type"] == "timm_wrapper" and config["architecture"] == "vit_tiny_patch16_224"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vit" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("timm_model.") for k in f.keys())
    result = _compare_in_child(folders, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)), tmp_path)
    assert result["vit"]["class"] == "EvitTimmWrapperForImageClassification"
    assert result["headless"]["class"] == "EvitTimmWrapperModel"
    for name, r in result.items():
        assert r["evit"] < 1e-5 and r["dense"] < 1e-5 and r["dense_vs_evit"] > 1e-3, (name, r)


def test_evit_load_reads_the_timmwrapper_layout_as_the_timm_model(tmp_path):
    model = tiny_timm("vit")
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    artifact.save(model, tmp_path / "m", layout="transformers")
    back = evit_cli.load(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert type(back).__name__ == type(model).__name__


def test_a_transformers_model_has_no_timm_layout(tmp_path):
    model, _ = _build("vit", "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2,))
    with pytest.raises(EvitError, match="drop --layout timm"):
        artifact.save(model, tmp_path / "m", layout="timm")
    with pytest.raises(EvitError, match="unknown layout"):
        artifact.save(model, tmp_path / "m", layout="onnx")
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- the shipped code


@pytest.mark.parametrize("entry", ["evit_cli.io.remote", "evit_cli.io.remote_timm"])
def test_the_shipped_code_is_self_contained_as_transformers_reads_it(entry, tmp_path):
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    files = bundle.write(tmp_path, entry)
    assert files[0] == bundle.ENTRY_FILE
    needed = get_relative_import_files(str(tmp_path / bundle.ENTRY_FILE))  # what transformers copies
    assert {Path(f).name for f in needed} == set(files[1:])
    imports = set().union(*(get_imports(str(tmp_path / f)) for f in files))
    assert "evit_cli" not in imports
    allowed = {"__future__", "abc", "contextlib", "copy", "dataclasses", "errno", "functools", "inspect", "logging",
               "math",
               "re", "sys", "typing", "torch", "transformers"}
    assert imports <= allowed | ({"timm"} if entry.endswith("timm") else set()), imports - allowed


def test_the_shipped_code_is_the_package_source_with_flat_imports(tmp_path):
    files = bundle.write(tmp_path, "evit_cli.io.remote")
    shipped = (tmp_path / "evit_algorithm_reorg.py").read_text().splitlines()
    source = (ROOT / "evit_cli" / "algorithm" / "reorg.py").read_text().splitlines()
    assert shipped[1:] == source  # no import of the package
    layer = (tmp_path / "evit_adapters_transformers_layer.py").read_text()
    assert "from .evit_adapters_block import BlockState" in layer and "from ..block" not in layer
    assert not [f for f in files if f.startswith("evit_adapters_timm")]  # a transformers model's code needs no timm


def test_a_module_the_flat_copy_cannot_keep_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "evit_cli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text("X = 1\n")
    monkeypatch.setattr(bundle, "ROOT", pkg)
    (pkg / "entry.py").write_text("from .sub import mod\n")
    with pytest.raises(EvitError, match="only `from .module import names`"):
        bundle.closure("evit_cli.entry")
    (pkg / "entry.py").write_text("import evit_cli.sub\n")
    with pytest.raises(EvitError, match="must import relatively"):
        bundle.closure("evit_cli.entry")
    (pkg / "entry.py").write_text("from .sub.mod import X\n")
    assert bundle.closure("evit_cli.entry") == ["evit_cli.entry", "evit_cli.sub.mod"]


def test_the_model_card_says_what_loads_how(tmp_path):
    model, _ = _build("vit", "sdpa")
    evit_cli.convert(model, keep_rate=0.5, layers=(2,))
    card = (evit_cli.save(model, tmp_path / "m") / "README.md").read_text()
    assert "evit_cli.load(" in card
    assert 'AutoModelForImageClassification.from_pretrained("path/to/this/folder", trust_remote_code=True)' in card
    assert "Without `trust_remote_code`" in card and "**dense** model" in card
    headless, _ = _build("dinov2", "sdpa")
    evit_cli.convert(headless, keep_rate=0.5, layers=(2,))
    assert "AutoModel.from_pretrained" in (evit_cli.save(headless, tmp_path / "h") / "README.md").read_text()


# --------------------------------------------------------------------------- pipeline on a real photo


@pytest.mark.skipif(REAL is None, reason="needs the real weights and photos of shared/real")
def test_pipeline_classifies_a_real_photo_with_the_shipped_code(tmp_path):
    """Real DeiT-Tiny in the TimmWrapper layout: transformers' pipeline, without evit, gives the photo's
    class, with the scores evit_cli.load gives on timm's preprocessing of the photo."""
    import timm
    from PIL import Image

    model = evit_cli.load_model("deit_tiny_patch16_224", pretrained=False,
                                checkpoint=REAL / "deit_tiny_patch16_224.safetensors")
    evit_cli.convert(model, keep_rate=0.7, layers=(4, 7, 10))
    folder = artifact.save(model, tmp_path / "deit", layout="transformers")
    photo = sorted((REAL / "imagenette-val" / "n01440764").glob("*.JPEG"))[0]  # tench, ImageNet class 0
    back = evit_cli.load(folder)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=back))
    with torch.no_grad():
        probs = back(transform(Image.open(photo).convert("RGB"))[None]).softmax(-1)[0]
    top = probs.topk(3)
    out = run_without_evit(f'''
        import json
        from transformers import pipeline
        clf = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        print(json.dumps({{"class": type(clf.model).__name__, "top": clf({str(photo)!r}, top_k=3)}}))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["class"] == "EvitTimmWrapperForImageClassification"
    assert result["top"][0]["label"].startswith("tench")
    assert [r["score"] for r in result["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_pipeline_on_a_transformers_export_with_its_processor(tmp_path):
    """A tiny ViT with a processor file: pipeline, without evit, gives the scores of evit_cli.load on
    the processor's pixels."""
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    model, _ = _build("vit", "sdpa")
    proc = {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2}
    evit_cli.model_state(model).preprocessor = proc
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 4))
    folder = evit_cli.save(model, tmp_path / "vit")
    photo = (sorted((REAL / "imagenette-val").glob("*/*.JPEG"))[0] if REAL else tmp_path / "p.png")
    if REAL is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(photo)
    x = ViTImageProcessor(**{k: v for k, v in proc.items() if k != "image_processor_type"})(
        Image.open(photo).convert("RGB"), return_tensors="pt").pixel_values
    with torch.no_grad():
        probs = evit_cli.load(folder)(x).logits.softmax(-1)[0]
    out = run_without_evit(f'''
        import json
        from transformers import pipeline
        clf = pipeline("image-classification", model={str(folder)!r}, trust_remote_code=True)
        print(json.dumps({{"class": type(clf.model).__name__, "top": clf({str(photo)!r}, top_k=5)}}))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["class"] == "EvitViTForImageClassification"
    expected = {model.config.id2label[i]: float(probs[i]) for i in range(5)}
    assert {r["label"]: r["score"] for r in result["top"]} == pytest.approx(expected, abs=1e-5)


def test_an_unknown_layout_is_one_line_before_any_loading(tmp_path, capsys):
    from evit_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["convert", "no_such_model_anywhere", "--layout", "onnx", "-o", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--layout timm or transformers" in err
    assert not (tmp_path / "o").exists()
