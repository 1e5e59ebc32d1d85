"""Every command in the README's ```bash blocks runs, offline, in order, from a fresh folder.

Each `evit ...` command runs in-process (`evit` -> `evit_cli.cli.main`), from a folder laid out
like a checkout (recipes/ and benchmarks/ beside it, ../shared/real reachable). What is changed,
all of it here and nothing else:

1. NARROW: the README's large timm models built with random weights (deit_small_patch16_224,
   deit_base_patch16_224) are built 24 wide with 2 heads instead of 384/768 with 6/12. Same 16-px
   patches, 224 px and 12 blocks, so layers 4,7,10, the token counts (197 -> 140 -> 100 -> 72),
   --img-size/--match-macs and every option behave as written; only the speed differs.
2. FAST: bench, eval, sweep and search time one repetition at batch 4 (`--reps 1 --batch 4`, bench
   also `--warmup 0`), and evaluation on the real photos reads a 16-image sample (`--limit 16`).
   The README's figures come from the full commands.
3. SET-UP: `python3 -m venv ...` and `pip install ...` are what this test's environment already
   is; they are skipped and the rest of the line runs. The test-suite command is this suite.
4. HELP_ONLY: the few commands below that need the network, 8 processes or hours run `--help` only.
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NARROW = {"deit_small_patch16_224", "deit_base_patch16_224"}
NARROW_ARCH = dict(embed_dim=24, num_heads=2)
TIMED = {"bench": ["--reps", "1", "--warmup", "0"], "eval": ["--reps", "1"], "sweep": ["--reps", "1"],
         "search": ["--reps", "1"]}
HELP_ONLY = {  # a substring of the command -> why it only runs --help here
    "-o deit_s_pretrained": "downloads pretrained weights from the hub",
    "--dataset beans": "downloads a data set and pretrained weights from the hub",
    "--recipe recipes/deit_small_keep0.7.yaml": "the recipe is 30 epochs of DeiT-S: hours on a CPU",
    "torchrun": "8 processes for hours",
    "--compile": "torch.compile builds C++ kernels for minutes on a CPU",
    "benchmarks/speed_table.py": "times DeiT-S and DeiT-B for most of an hour",
    "benchmarks/coverage.py": "builds all 373 ViT-like timm models: minutes",
    "benchmarks/layouts_real.py": "runs the real DeiT-Tiny in three layouts on 3925 photos: about 20 minutes "
                                  "(tests/test_transformers_real.py runs the same check on 16)",
    "benchmarks/recover_real.py": "fine-tunes the real DeiT-Tiny on 2943 photos for most of an hour",
    "benchmarks/generalize_real.py": "fine-tunes the real DeiT-Tiny four times: most of an hour",
    "benchmarks/embed_real.py": "fine-tunes the headless real DeiT-Tiny: most of an hour",
    "benchmarks/claims_real.py": "scores the real DeiT-Tiny in nine settings on 982 photos: minutes",
    "benchmarks/recovery_variants.py": "fine-tunes the real DeiT-Tiny: minutes per variant",
    "deit_t_recovered": "fine-tunes the real DeiT-Tiny for minutes (tests/test_fidelity.py trains the same way on tiny "
                        "models)",
    "--oracle": "fine-tunes the real DeiT-Tiny for minutes (tests/test_oracle.py trains the same way on tiny models)",
}
SETUP = ("python3 -m venv", ".venv/bin/pip install")
SUITE = (".venv/bin/python -m pytest", ".venv/bin/ruff check")


def readme_commands() -> list[str]:
    """Each command of the README's ```bash blocks, `&&` chains split, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(shlex.join(words))
    return commands


def _narrow(monkeypatch) -> None:
    import timm

    create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if name in NARROW and not pretrained:
            kwargs = {**NARROW_ARCH, **kwargs}
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)


def _help_only(command: str) -> str | None:
    return next((why for key, why in HELP_ONLY.items() if key in command), None)


def _evit_args(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] in ("evit", ".venv/bin/evit"):
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("evit_cli") + 1:]
    raise AssertionError(f"not an evit command: {command}")


def _without(args: list[str], option: str) -> list[str]:
    while option in args:
        i = args.index(option)
        args = args[:i] + args[i + 2:]
    return args


def _shortened(args: list[str]) -> list[str]:
    if args[0] in TIMED:
        args = _without(args, "--batch") + TIMED[args[0]] + ["--batch", "4"]
    if args[0] in ("eval", "sweep", "search") and "--dataset" in args:
        args = _without(args, "--limit") + ["--limit", "16"]
    return args


def _run_help(command: str, capsys) -> None:
    if command.startswith("python benchmarks/"):
        script = command.split()[1]
        old = sys.argv
        sys.argv = [script, "--help"]
        try:
            with pytest.raises(SystemExit) as e:
                runpy.run_path(str(ROOT / script), run_name="__main__")
        finally:
            sys.argv = old
        assert e.value.code == 0
        return
    args = _evit_args(command)
    sub = next(a for a in args if not a.startswith("-"))
    code, stdout, stderr = run([sub, "--help"], capsys)
    assert code == 0 and "Example" in stdout, (command, stderr)


@pytest.mark.skipif(not (SHARED / "real" / "deit_tiny_patch16_224.safetensors").is_file(),
                    reason="the README's commands use ../shared/real")
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    checkout = tmp_path / "evit"
    checkout.mkdir()
    for name in ("recipes", "benchmarks"):
        (checkout / name).symlink_to(ROOT / name)
    (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _narrow(monkeypatch)
    commands = readme_commands()
    assert len(commands) >= 20
    ran = []
    for command in commands:
        if command.startswith(SETUP) or command.startswith(SUITE):
            continue
        if _help_only(command):
            _run_help(command, capsys)
            continue
        args = _shortened(_evit_args(command))
        torch.manual_seed(0)  # random-weight models the same every run (ONNX's check then sees the same ties)
        t0 = time.perf_counter()
        code, stdout, stderr = run(args, capsys)
        print(f"{time.perf_counter() - t0:6.1f}s  {command}", file=sys.__stderr__)
        assert code == 0, f"{command}\n{stderr}"
        if "--json" in args:
            json.loads(stdout)
        ran.append(args[0])
    assert {"convert", "bench", "eval", "sweep", "search", "visualize", "export", "info"} <= set(ran)
    assert (checkout / "deit_s_evit" / "bench.json").is_file() and (checkout / "sweep" / "sweep.png").is_file()
    assert (checkout / "tokens.png").is_file() and (checkout / "reports" / "bench.json").is_file()
