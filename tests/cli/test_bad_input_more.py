"""More bad input, run as a user would: folders where a file is expected (and files where a folder
is), sizes that cannot fit in memory, corrupt or empty model files, non-UTF-8 and unreadable files.
Each ends with exit 2, one line on stderr naming what was wrong and what to do, no traceback, and
nothing left behind."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_timm
from safetensors.torch import save_file
from test_bad_input import test_bad_input as check_bad_input
from test_cli import run
from test_train import write_colour_folder

import evit_cli


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace of good and broken model files, data sets and images."""
    root = tmp_path_factory.mktemp("ws_more")
    evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2, 4)), root / "m")
    write_colour_folder(root / "colours", 3)
    (root / "afile").write_text("a regular file\n")
    (root / "emptydir").mkdir()
    _checkpoints(root)
    _transformers_folders(root)
    _exported_folders(root)
    _data_sets(root)
    return root


def _checkpoints(root):
    sd = {k: v.contiguous() for k, v in tiny_timm("vit").state_dict().items()}
    save_file(sd, root / "tiny.safetensors")
    torch.save(sd, root / "tiny.pth")
    (root / "weights").mkdir()
    shutil.copy(root / "tiny.safetensors", root / "weights" / "model.safetensors")
    for name in ("zero.safetensors", "zero.pth", "zero.bin"):
        (root / name).write_bytes(b"")
    data = (root / "tiny.pth").read_bytes()
    (root / "cut.pth").write_bytes(data[: len(data) // 2])
    (root / "json.pth").write_text('{"weights": [1, 2, 3]}')
    (root / "json.safetensors").write_text('{"weights": [1, 2, 3]}')
    (root / "noise.bin").write_bytes(bytes(range(200, 256)) * 4)


def _transformers_folders(root):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(root / "hf")
    (root / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}}))
    broken = {"hf_cfg_empty": ("config.json", b""), "hf_cfg_list": ("config.json", b"[1, 2]"),
              "hf_cfg_latin1": ("config.json", "{\"model_type\": \"vit\", \"name\": \"caf\xe9\"}".encode("latin-1")),
              "hf_cfg_types": ("config.json", None), "hf_proc_bad": ("preprocessor_config.json", b"{not json"),
              "hf_proc_list": ("preprocessor_config.json", b"[1]"),
              "hf_proc_latin1": ("preprocessor_config.json", b"\xff\xfe{}"), "hf_w_zero": ("model.safetensors", b"")}
    for name, (file, content) in broken.items():
        shutil.copytree(root / "hf", root / name)
        if content is None:
            config = json.loads((root / "hf" / "config.json").read_text())
            content = json.dumps({**config, "hidden_size": "big"}).encode()
        (root / name / file).write_bytes(content)
    shutil.copytree(root / "hf", root / "hf_cfg_dir")
    (root / "hf_cfg_dir" / "config.json").unlink()
    (root / "hf_cfg_dir" / "config.json").mkdir()
    data = (root / "hf" / "model.safetensors").read_bytes()
    shutil.copytree(root / "hf", root / "hf_w_cut")
    (root / "hf_w_cut" / "model.safetensors").write_bytes(data[: len(data) // 2])


def _exported_folders(root):
    meta = json.loads((root / "m" / "evit.json").read_text())
    metas = {"m_classes_text": {**meta, "num_classes": "three"}, "m_size_negative": {**meta, "img_size": -32},
             "m_layers_text": {**meta, "evit": {**meta["evit"], "layers": "2,4"}},
             "m_source_model_number": {**meta, "source": {**meta["source"], "model": 42}},
             "m_family_keras": {**meta, "family": "keras"}}
    for name, content in metas.items():
        shutil.copytree(root / "m", root / name)
        (root / name / "evit.json").write_text(json.dumps(content))
    for name, content in {"m_meta_empty": b"", "m_meta_list": b"[]", "m_meta_latin1": b"\xff\xfe{}"}.items():
        shutil.copytree(root / "m", root / name)
        (root / name / "evit.json").write_bytes(content)
    shutil.copytree(root / "m", root / "m_meta_dir")
    (root / "m_meta_dir" / "evit.json").unlink()
    (root / "m_meta_dir" / "evit.json").mkdir()
    for name in ("m_w_missing", "m_w_dir", "m_w_zero"):
        shutil.copytree(root / "m", root / name)
        (root / name / "model.safetensors").unlink()
    (root / "m_w_dir" / "model.safetensors").mkdir()
    (root / "m_w_zero" / "model.safetensors").write_bytes(b"")


def _data_sets(root):
    import datasets
    from PIL import Image

    ds = datasets.load_dataset("imagefolder", data_dir=str(root / "colours"))["train"]
    ds.to_parquet(str(root / "good.parquet"))
    data = (root / "good.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(data[: len(data) // 2])
    (root / "zero.parquet").write_bytes(b"")
    (root / "pq_dir").mkdir()
    (root / "pq_dir" / "train.parquet").write_bytes(data[: len(data) // 2])
    ds.save_to_disk(str(root / "saved_badstate"))
    (root / "saved_badstate" / "state.json").write_text("{bad")
    (root / "textonly" / "a").mkdir(parents=True)
    (root / "textonly" / "a" / "notes.txt").write_text("no images here\n")
    shutil.copytree(root / "colours", root / "col_zero_image")
    (root / "col_zero_image" / "red" / "zero.jpg").write_bytes(b"")
    Image.new("RGB", (40, 40), "red").save(root / "ok.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image\n")
    (root / "latin1.yaml").write_bytes(b"epochs: caf\xe9\n")


M, HF = "m", "hf"
T = ["deit_tiny_patch16_224", "--no-pretrained"]  # a timm name that takes --checkpoint
C = ["convert"] + T
CASES = [
    # a folder where a file is expected, and a file where a folder is
    ("checkpoint is a folder", C + ["-c", "weights", "-o", "o"],
     "checkpoint weights is a folder, not a weights file: give the file inside it (--checkpoint "
     "weights/model.safetensors)"),
    ("checkpoint is an empty folder", C + ["-c", "emptydir", "-o", "o"], "emptydir is a folder, not a weights file"),
    ("checkpoint is a folder, eval", ["eval"] + T + ["-c", "weights", "-d", "colours"],
     "is a folder, not a weights file"),
    ("checkpoint is a folder, sweep", ["sweep"] + T + ["-c", "weights", "-o", "sw"], "is a folder, not a weights file"),
    ("checkpoint is a folder, search", ["search"] + T + ["-c", "weights", "--target-gmacs", "1"],
     "is a folder, not a weights file"),
    ("checkpoint is a folder, visualize", ["visualize"] + T + ["ok.png", "-c", "weights", "-o", "v.png"],
     "is a folder, not a weights file"),
    ("evit.json is a folder", ["convert", "m_meta_dir", "-o", "o"], "m_meta_dir/evit.json is a folder, not a file"),
    ("config.json is a folder", ["convert", "hf_cfg_dir", "-o", "o"], "hf_cfg_dir/config.json is a folder, not a file"),
    ("weights of an export are a folder", ["convert", "m_w_dir", "-o", "o"], "m_w_dir has no model.safetensors file"),
    ("weights of an export missing", ["bench", "m_w_missing"], "export the model again"),
    ("data set is a text file", ["eval", M, "-d", "afile", "--workers", "0"],
     "data set afile is a file, not a data set"),
    ("data set is an image file", ["eval", M, "-d", "ok.png", "--workers", "0"],
     "data set ok.png is a file, not a data set"),
    ("data set is a file, sweep", ["sweep", M, "-d", "afile", "-o", "sw"], "is a file, not a data set"),
    ("image is a folder", ["visualize", M, "emptydir", "-o", "v.png"],
     "cannot read image emptydir: it is a folder, not an image file"),
    ("image missing, beside a good one", ["visualize", M, "ok.png", "gone.png", "-o", "v.png"],
     "cannot read image gone.png: it does not exist"),
    ("eval report below a file", ["eval", M, "-d", "colours", "--report", "afile/r"], "afile is a file"),
    ("bench report is a file", ["bench", M, "--report", "afile"], "is a file, not a folder"),
    ("export output in a missing folder below a file", ["export", M, "-f", "torchscript", "-o", "afile/x/m.pt"],
     "afile is a file"),
    ("convert output is the current folder", ["convert", M, "-o", "."], "already exists"),
    # corrupt, empty and truncated weights
    ("checkpoint zero-byte safetensors", C + ["-c", "zero.safetensors", "-o", "o"],
     "checkpoint zero.safetensors is empty (0 bytes)"),
    ("checkpoint zero-byte pth", C + ["-c", "zero.pth", "-o", "o"], "checkpoint zero.pth is empty (0 bytes)"),
    ("checkpoint zero-byte bin", C + ["-c", "zero.bin", "-o", "o"], "is empty (0 bytes)"),
    ("checkpoint truncated pth", C + ["-c", "cut.pth", "-o", "o"], "cut.pth is not a readable PyTorch checkpoint"),
    ("checkpoint is JSON named pth", C + ["-c", "json.pth", "-o", "o"],
     "json.pth is not a readable PyTorch checkpoint or safetensors file (it holds text)"),
    ("checkpoint is JSON named safetensors", C + ["-c", "json.safetensors", "-o", "o"], "(it holds text)"),
    ("checkpoint is binary noise", C + ["-c", "noise.bin", "-o", "o"], "its first bytes are neither's"),
    ("export's weights zero bytes", ["convert", "m_w_zero", "-o", "o"], "model.safetensors is empty (0 bytes)"),
    ("transformers weights zero bytes", ["convert", "hf_w_zero", "-l", "2", "-o", "o"], "download or save it again"),
    ("transformers weights truncated", ["convert", "hf_w_cut", "-l", "2", "-o", "o"],
     "cannot load hf_w_cut with transformers"),
    # config.json, preprocessor_config.json, evit.json
    ("config.json empty", ["convert", "hf_cfg_empty", "-o", "o"], "hf_cfg_empty/config.json is not valid JSON"),
    ("config.json a list", ["convert", "hf_cfg_list", "-o", "o"],
     "config.json does not hold a JSON object (it holds a list)"),
    ("config.json not UTF-8", ["convert", "hf_cfg_latin1", "-o", "o"],
     "config.json is not valid JSON (UnicodeDecodeError"),
    ("config.json wrong types", ["convert", "hf_cfg_types", "-o", "o"], "Field 'hidden_size' expected int"),
    ("preprocessor config not JSON", ["convert", "hf_proc_bad", "-l", "2", "-o", "o"],
     "preprocessor_config.json is not valid JSON"),
    ("preprocessor config a list", ["convert", "hf_proc_list", "-l", "2", "-o", "o"],
     "preprocessor_config.json does not hold a JSON object"),
    ("preprocessor config not UTF-8", ["convert", "hf_proc_latin1", "-l", "2", "-o", "o"],
     "preprocessor_config.json is not valid JSON"),
    ("evit.json empty", ["convert", "m_meta_empty", "-o", "o"], "evit.json is not valid JSON"),
    ("evit.json a list", ["info", "m_meta_list"],
     "evit.json does not hold a JSON object (it holds a list): export the model again"),
    ("evit.json not UTF-8", ["bench", "m_meta_latin1"], "evit.json is not valid JSON (UnicodeDecodeError"),
    ("evit.json classes as text", ["convert", "m_classes_text", "-o", "o"],
     "num_classes must be an integer, 0 or more, got 'three'"),
    ("evit.json classes as text, info", ["info", "m_classes_text"], "num_classes must be an integer"),
    ("evit.json classes as text, export", ["export", "m_classes_text", "-f", "torchscript"],
     "num_classes must be an integer"),
    ("evit.json negative image size", ["eval", "m_size_negative", "-d", "colours"],
     "img_size must be a positive integer, got -32"),
    ("evit.json layers as text", ["convert", "m_layers_text", "-o", "o"],
     "evit must be an object with layers and keep_rates"),
    ("evit.json model a number", ["convert", "m_source_model_number", "-o", "o"],
     "source.model must be a text, got 42"),
    ("evit.json unknown family", ["info", "m_family_keras"], "family must be 'timm' or 'transformers', got 'keras'"),
    # corrupt data sets and images
    ("parquet zero bytes", ["eval", M, "-d", "zero.parquet", "--workers", "0"], "cannot read data set zero.parquet"),
    ("parquet truncated", ["eval", M, "-d", "cut.parquet", "--workers", "0"], "is it complete? write or copy it again"),
    ("parquet folder truncated", ["eval", M, "-d", "pq_dir", "--workers", "0"], "cannot read data set pq_dir"),
    ("save_to_disk state corrupt", ["eval", M, "-d", "saved_badstate", "--workers", "0"],
     "cannot read data set saved_badstate"),
    ("folder without images", ["eval", M, "-d", "textonly", "--workers", "0"], "no images under textonly"),
    ("zero-byte image in a data set", ["eval", M, "-d", "col_zero_image", "--workers", "0"],
     "zero.jpg: it cannot be decoded"),
    ("zero-byte image", ["visualize", M, "zero.png", "-o", "v.png"],
     "cannot read image zero.png: it cannot be decoded"),
    ("text named png", ["visualize", M, "text.png", "-o", "v.png"], "cannot read image text.png"),
    ("recipe not UTF-8", ["finetune", M, "-d", "colours", "-o", "ft", "--recipe", "latin1.yaml"], "is not UTF-8 text"),
    # sizes that cannot fit in memory, refused before anything is allocated
    ("image size 100000", ["convert", M, "--img-size", "100000", "-o", "o"],
     "--img-size 100000 needs at least 840 GB of memory for one pass"),
    ("image size 100000, transformers", ["convert", HF, "--img-size", "100000", "-o", "o"],
     "--img-size 100000 needs at least"),
    ("match-macs 100000", ["convert", M, "--match-macs", "100000", "-o", "o"], "lower --match-macs"),
    ("bench batch 1e9", ["bench", M, "--batch", "1000000000"], "--batch 1000000000 needs at least 87.2 TB"),
    ("bench batch 2e8", ["bench", M, "--batch", "200000000", "--report", "rep"], "lower --batch"),
    ("transformers head of 1e9 classes", ["convert", HF, "--no-pretrained", "--num-classes", "1000000000", "-o", "o"],
     "--num-classes 1000000000 needs about 228 GB of memory for the classifier head"),
]

# Sizes found too large only when the allocation fails: on Linux a request above what memory and swap
# can ever hold fails at once unless overcommit is set to "always" (1), where it would be killed instead.
_OVERCOMMIT = (open("/proc/sys/vm/overcommit_memory").read().strip() if os.path.exists("/proc/sys/vm/overcommit_memory")
               else "?")
ALLOCATION_CASES = [
    ("eval batch 1e9", ["eval", M, "-d", "colours", "--batch", "1000000000", "--workers", "0"],
     "--batch 1000000000 needs at least 87.2 TB of memory for one pass"),
    ("sweep batch 1e9", ["sweep", M, "--batch", "1000000000", "-o", "sw"], "12.3 TB did not fit"),
    ("search batch 1e9", ["search", M, "--batch", "1000000000", "--target-gmacs", "1"], "12.3 TB did not fit"),
    ("export check batch 1e9", ["export", M, "-f", "torchscript", "-o", "m.pt", "--check-batches", "1000000000"],
     "12.3 TB did not fit"),
    ("timm head of 1e9 classes", C + ["--num-classes", "1000000000", "-o", "o"],
     "768 GB did not fit in one allocation; lower --num-classes"),
    ("finetune image size 100000",
     ["finetune", M, "-d", "colours", "-o", "ft", "--img-size", "100000", "--workers", "0"],
     "--img-size 100000 needs at least"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_more(args, message, ws, capsys, monkeypatch):
    check_bad_input(args, message, ws, capsys, monkeypatch)


@pytest.mark.skipif(_OVERCOMMIT not in ("0", "2"),
                    reason="an impossible allocation only fails cleanly without overcommit")
@pytest.mark.parametrize("args, message", [c[1:] for c in ALLOCATION_CASES], ids=[c[0] for c in ALLOCATION_CASES])
def test_allocation_that_cannot_fit(args, message, ws, capsys, monkeypatch):
    check_bad_input(args, message, ws, capsys, monkeypatch)


def test_case_names_are_unique():
    names = [c[0] for c in CASES + ALLOCATION_CASES]
    assert len(names) == len(set(names))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every file")
@pytest.mark.parametrize("target, args, message", [
    ("tiny.safetensors", C + ["-c", "{}", "-o", "o"], "permission denied"),
    ("colours", ["eval", M, "-d", "{}", "--workers", "0"], "permission denied"),
    ("ok.png", ["visualize", M, "{}", "-o", "v.png"], "cannot be opened (permission denied)"),
    ("hf/config.json", ["convert", HF, "-o", "o"], "permission denied"),
])
def test_unreadable_paths(target, args, message, ws, capsys, monkeypatch):
    path = ws / target
    mode = path.stat().st_mode
    os.chmod(path, 0)
    try:
        check_bad_input([a.replace("{}", target) for a in args], message, ws, capsys, monkeypatch)
    finally:
        os.chmod(path, mode)


# --------------------------------------------------------------------------- the one place errors are mapped


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 120000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory: 120 GB did not fit in one allocation; lower --batch"),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1536 bytes."),
     "out of memory: 1.54 KB did not fit"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB"),
     "out of GPU memory: 21.5 GB did not fit"),  # 20 GiB = 21.47e9 bytes
    (MemoryError(), "out of memory; lower --batch (or --batch-size), --img-size"),
])
def test_out_of_memory_is_the_users_to_fix(error, expected):
    from evit_cli.errors import user_message

    message = user_message(error)
    assert message is not None and message.startswith(expected), message
    assert "\n" not in message


def test_other_runtime_errors_stay_bugs():
    from evit_cli.errors import user_message

    assert user_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_memory_estimate_is_counted_by_hand_and_is_what_one_block_holds_at_once(ws):
    """The refusal's estimate for the tiny model (32 px, patch 4, width 48, 1 class token) against a
    count by hand, and against tensors that one real pass holds at the same time: the images, the
    first block's input, and its MLP's input and 4x-wide hidden layer."""
    from evit_cli.model.validate import forward_bytes

    model = evit_cli.load(ws / M)
    tokens = (32 // 4) ** 2 + 1
    assert forward_bytes(model, batch=2) == 4 * 2 * (3 * 32 * 32 + 6 * tokens * 48)
    assert forward_bytes(model, batch=1, img_size=64) == 4 * (3 * 64 * 64 + 6 * ((64 // 4) ** 2 + 1) * 48)
    seen = {}

    def size(t):
        return t.numel() * t.element_size()

    block, fc1 = model.blocks[0], model.blocks[0].mlp.fc1
    hooks = [block.register_forward_hook(lambda m, i, o: seen.__setitem__("block_in", size(i[0]))),
             fc1.register_forward_hook(lambda m, i, o: seen.update(fc1_in=size(i[0]), fc1_out=size(o)))]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert forward_bytes(model, batch=2) == size(x) + seen["block_in"] + seen["fc1_in"] + seen["fc1_out"]


def test_sizes_that_fit_are_not_refused(ws, capsys, tmp_path):
    code, _, stderr = run(["convert", ws / M, "--img-size", "64", "-o", tmp_path / "big"], capsys)
    assert code == 0, stderr
    assert evit_cli.load(tmp_path / "big").patch_embed.img_size == (64, 64)
    code, _, stderr = run(["bench", ws / M, "--batch", "512", "--reps", "1", "--warmup", "0", "--report", tmp_path],
                          capsys)
    assert code == 0, stderr
