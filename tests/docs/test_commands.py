"""Every command in the ```bash blocks of README.md and of the docs pages runs, offline, in order, from
a fresh folder.

The pages are read in the order a reader meets them: README.md, then docs/ in the order of
mkdocs.yml's nav. Each `evit ...` command runs in-process (`evit` -> `evit_cli.cli.main`), from a
folder laid out like a checkout (recipes/ and benchmarks/ beside it, ../shared/real reachable). What
is changed, all of it here and nothing else:

1. NARROW: the large timm models built with random weights (deit_small_patch16_224,
   deit_base_patch16_224) are built 24 wide with 2 heads instead of 384/768 with 6/12. Same 16-px
   patches, 224 px and 12 blocks, so layers 4,7,10, the token counts (197 -> 140 -> 100 -> 72),
   --img-size/--match-macs and every option behave as written; only the speed differs.
2. FAST: bench, eval, sweep and search time one repetition at batch 4 (`--reps 1 --batch 4`, bench
   also `--warmup 0`); evaluation on the real photos reads a 16-image sample (`--limit 16`), and the
   accuracy searches (`--max-drop`, `--min-agreement`, `--min-cosine`), which evaluate dozens of
   candidates, a 4-image one. The pages' figures come from the full commands.
3. SET-UP: `python3 -m venv ...` and `pip install ...` are what this test's environment already
   is; they are skipped and the rest of the line runs. The test-suite command is this suite.
4. HELP_ONLY: the few commands below that need the network, 8 processes or hours run `--help` only.
5. ONCE: a command written on several pages runs once, where it first appears; one module-scoped
   fixture runs them all and every test reads its results.
6. ONE THREAD: torch runs on one thread meanwhile: the test machines share two cores between
   several jobs, and oversubscribed OpenMP threads made the same commands several times slower.
"""

from __future__ import annotations

import io
import json
import re
import runpy
import shlex
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
REAL = SHARED / "real" / "deit_tiny_patch16_224.safetensors"
NARROW = {"deit_small_patch16_224", "deit_base_patch16_224"}
NARROW_ARCH = dict(embed_dim=24, num_heads=2)
TIMED = {"bench": ["--reps", "1", "--warmup", "0"], "eval": ["--reps", "1"], "sweep": ["--reps", "1"],
         "search": ["--reps", "1"]}
SAMPLE, SEARCH_SAMPLE = "16", "4"
ACCURACY_SEARCH = ("--max-drop", "--min-agreement", "--min-cosine")
HELP_ONLY = {  # a substring of the command -> why it only runs --help here
    "-o deit_s_pretrained": "downloads pretrained weights from the hub",
    "--dataset beans": "downloads a data set and pretrained weights from the hub",
    "--recipe recipes/deit_small.yaml": "the recipe is 30 epochs of DeiT-S: hours on a CPU",
    "torchrun": "8 processes for hours",
    "--compile": "torch.compile builds C++ kernels for minutes on a CPU",
    "benchmarks/speed_table.py": "times DeiT-S and DeiT-B for most of an hour",
    "benchmarks/coverage.py": "builds all 373 ViT-like timm models: minutes",
    "benchmarks/layouts_real.py": "runs the real DeiT-Tiny in three layouts on 3925 photos: about 20 minutes "
                                  "(tests/adapters/test_transformers_real.py runs the same check on 16)",
    "benchmarks/generalize_real.py": "fine-tunes the real DeiT-Tiny four times: most of an hour",
    "benchmarks/embed_real.py": "fine-tunes the headless real DeiT-Tiny: most of an hour",
    "benchmarks/claims_real.py": "scores the real DeiT-Tiny in nine settings on 982 photos: minutes",
    "benchmarks/training_free_real.py": "scores the real DeiT-Tiny in seventeen settings on 3925 photos: an hour "
                                        "(--speed-only: their timing again, 17 minutes)",
    "benchmarks/dense_real.py": "scores the real DeiT-Tiny's maps in fifteen settings on 3925 photos and times "
                                "DeiT-Small: most of an hour (tests/adapters/test_dense.py checks the restore)",
    "benchmarks/no_class_token_real.py": "scores the real DeiT-Tiny with three token scores on up to 3925 photos: "
                                         "minutes to an hour",
    "recovery_variants.py": "fine-tunes the real DeiT-Tiny: minutes per variant",
    "deit_t_recovered": "fine-tunes the real DeiT-Tiny for minutes (tests/measure/test_fidelity.py trains the same way "
                        "on tiny models); exporting or evaluating its output needs it",
    "--oracle": "fine-tunes the real DeiT-Tiny for minutes (tests/model/test_oracle.py trains the same way on tiny "
                "models)",
}
SETUP = ("python3 -m venv", ".venv/bin/pip install")
SUITE = (".venv/bin/python -m pytest", ".venv/bin/ruff check")
JOBS = {"convert", "bench", "eval", "sweep", "search", "visualize", "export", "info"}


def pages() -> list[Path]:
    """README.md, then the docs pages in the order of mkdocs.yml's nav."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = [next(iter(entry.values())) if isinstance(entry, dict) else entry for entry in config["nav"]]
    return [ROOT / "README.md", *(ROOT / "docs" / page for page in nav)]


PAGES = pages()


def page_commands(path: Path) -> list[str]:
    """Each command of a page's ```bash blocks, `&&` chains split, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(shlex.join(words))
    return commands


def runnable(command: str) -> bool:
    return not command.startswith(SETUP) and not command.startswith(SUITE)


def all_commands() -> list[str]:
    """Every distinct command of every page, in reading order (the first place it appears)."""
    return list(dict.fromkeys(c for page in PAGES for c in page_commands(page)))


@dataclass
class Ran:
    """What one command did: the arguments it ran with, exit code, output, seconds."""

    args: list[str]
    code: int | None
    stdout: str
    stderr: str
    seconds: float
    help_only: bool = False


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
        sample = SEARCH_SAMPLE if args[0] == "search" and set(ACCURACY_SEARCH) & set(args) else SAMPLE
        args = _without(args, "--limit") + ["--limit", sample]
    return args


def _captured(function, argv: list[str]) -> tuple[int | None, str, str]:
    """Run ``function()`` with ``sys.argv = argv``, stdout and stderr captured: (the exit code it ended
    with, None if it returned instead; stdout; stderr)."""
    out, err, old = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = argv
    try:
        with redirect_stdout(out), redirect_stderr(err):
            function()
        code = None
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def _evit(args: list[str]) -> tuple[int, str, str]:
    from evit_cli.cli import main

    code, stdout, stderr = _captured(main, ["evit", *args])
    return (0 if code is None else code), stdout, stderr


def _run_help(command: str) -> Ran:
    if command.startswith("python benchmarks/"):
        script = command.split()[1]
        args = [script, "--help"]
        code, stdout, stderr = _captured(lambda: runpy.run_path(str(ROOT / script), run_name="__main__"), args)
        return Ran(args, code, stdout, stderr, 0.0, help_only=True)
    args = _evit_args(command)
    args = [next(a for a in args if not a.startswith("-")), "--help"]
    return Ran(args, *_evit(args), 0.0, help_only=True)


def _run(command: str) -> Ran:
    """Run one command (or its --help); an exception is its result too, so the other commands still run."""
    try:
        if _help_only(command):
            return _run_help(command)
        args = _shortened(_evit_args(command))
        torch.manual_seed(0)  # random-weight models the same every run (ONNX's check then sees the same ties)
        t0 = time.perf_counter()
        code, stdout, stderr = _evit(args)
    except Exception:  # reported by the test of the page that holds the command
        return Ran(shlex.split(command), None, "", traceback.format_exc(), 0.0)
    seconds = time.perf_counter() - t0
    print(f"{seconds:6.1f}s  {command}", file=sys.__stderr__)
    return Ran(args, code, stdout, stderr, seconds)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh folder laid out like a checkout, with ../shared beside it."""
    if not REAL.is_file():
        pytest.skip("the pages' commands use ../shared/real")
    tmp = tmp_path_factory.mktemp("pages")
    folder = tmp / "evit"
    folder.mkdir()
    for name in ("recipes", "benchmarks"):
        (folder / name).symlink_to(ROOT / name)
    (tmp / "shared").symlink_to(SHARED)
    return folder


@pytest.fixture(scope="module")
def ran(checkout) -> dict[str, Ran]:
    """Every distinct runnable command of the pages, run once, in reading order."""
    threads = torch.get_num_threads()
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(checkout)
        mp.setenv("HF_HUB_OFFLINE", "1")
        _narrow(mp)
        torch.set_num_threads(1)
        try:
            for command in filter(runnable, all_commands()):
                results[command] = _run(command)
        finally:
            torch.set_num_threads(threads)
    return results


def test_the_pages_hold_the_commands():
    commands = all_commands()
    assert len(commands) >= 20
    assert len(page_commands(ROOT / "README.md")) >= 8
    assert all(page.is_file() for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_of_the_page_runs(page, ran):
    for command in filter(runnable, page_commands(page)):
        r = ran[command]
        for word in shlex.split(command):  # a recipe or script a command names is there, --help only or not
            if word.startswith(("recipes/", "benchmarks/")):
                assert (ROOT / word).exists(), f"{page.name}: {command}: no {word}"
        if r.help_only:  # a script's --help exits 0 (argparse); evit's shows an example
            assert r.code == 0, (command, r.stderr)
            if not r.args[0].endswith(".py"):
                assert "Example" in r.stdout, (command, r.stdout)
            continue
        assert r.code == 0, f"{command}\n{r.stderr}"
        if "--json" in r.args:
            json.loads(r.stdout)


def test_every_job_runs(ran):
    assert JOBS <= {r.args[0] for r in ran.values() if not r.help_only}


def test_the_commands_write_their_files(checkout, ran):
    assert ran
    assert (checkout / "deit_s_evit" / "bench.json").is_file() and (checkout / "sweep" / "sweep.png").is_file()
    assert (checkout / "tokens.png").is_file() and (checkout / "reports" / "bench.json").is_file()
