"""What the benchmark scripts share: the real DeiT-Tiny and photos of ../shared/real, the held-out split,
the dense reference, scoring against it, progress, the command line and the result files.

Not a benchmark itself. The scripts import it as ``_common`` (their folder on ``sys.path``); importing it
puts this checkout first on ``sys.path`` too, so a benchmark measures the package beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
# ../shared/real beside the checkout (or beside a folder above it, for a worktree)
REAL = next((p / "shared" / "real" for p in ROOT.parents if (p / "shared" / "real").is_dir()),
            ROOT.parent / "shared" / "real")
WEIGHTS = REAL / "deit_tiny_patch16_224.safetensors"
PHOTOS = REAL / "imagenette-val"
# ImageNet-1k index of each Imagenette synset (../shared/real/README.md)
SYNSET_INDEX = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
                "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888257": 701}
SYNSETS = sorted(SYNSET_INDEX)  # class number c (0..9) is SYNSETS[c]
SUFFIXES = {".jpeg", ".jpg", ".png"}


# --------------------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    """argparse with the docstring as description and one-line usage errors (exit 2)."""

    def __init__(self, doc: str, **kwargs):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):  # one line on stderr, exit 2 (argparse would print the whole usage first)
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def add_evit_options(ap: argparse.ArgumentParser) -> None:
    """--keep and --layers: the EViT setting of the real-photo benchmarks (check_args parses them)."""
    ap.add_argument("--keep", type=float, default=0.7, help="EViT keep rate. [0.7]")
    ap.add_argument("--layers", default="4,7,10", help="1-based EViT layers, the paper's. [4,7,10]")


def parse_classes(text: str) -> list[int]:
    """'0-4' or '0,2,4,6,8' -> class numbers (0..9 in synset order)."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        out += range(lo, hi + 1)
    if not out or any(c < 0 or c > 9 for c in out) or len(set(out)) != len(out):
        raise ValueError(text)
    return sorted(out)


def parse_layers(text: str) -> list[int]:
    """'4,7,10' -> [4, 7, 10]: increasing 1-based block numbers of DeiT-Tiny (1..12)."""
    out = [int(x) for x in text.split(",")]
    if not out or any(not 1 <= n <= 12 for n in out) or out != sorted(set(out)):
        raise ValueError(text)
    return out


def check_args(ap: argparse.ArgumentParser, args, counts=()) -> None:
    """Usage errors (one line, exit 2) for ``counts`` (options that must be at least 1) and, where the
    script has them, --workers, --keep, --epochs and --layers (parsed into ``args.layer_list``)."""
    for name in counts:
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if getattr(args, "workers", 0) < 0:
        ap.error(f"--workers must be at least 0, got {args.workers}")
    if hasattr(args, "keep") and not 0 < args.keep <= 1:
        ap.error(f"--keep must be in (0, 1], got {args.keep}")
    if getattr(args, "epochs", None) is not None and not args.epochs > 0:
        ap.error(f"--epochs must be above 0, got {args.epochs}")
    if hasattr(args, "layers"):
        try:
            args.layer_list = parse_layers(args.layers)
        except ValueError:
            ap.error(f"--layers {args.layers!r}: expected increasing 1-based block numbers 1..12 such as 4,7,10")


def command(script: str) -> str:
    """How this run was started, for the result files: ``python benchmarks/X.py ARGS``."""
    path = Path(script).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"python {shown.as_posix()} " + shlex.join(sys.argv[1:])


def machine() -> str:
    """The processor and the threads torch uses, for the result files."""
    import torch

    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_script(script: str, parse, work, render, argv=None) -> int:
    """A real-photo benchmark's command line: the real weights and photos must be there (exit 2); Ctrl-C
    is "interrupted" (exit 130), a failed run one line (exit 1); the result is printed as Markdown."""
    args = parse(argv)
    if not WEIGHTS.exists() or not PHOTOS.is_dir():
        sys.stderr.write(f"{script}: error: {REAL} must hold the DeiT-Tiny weights and imagenette-val\n")
        return 2
    try:
        result = work(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except RuntimeError as e:
        sys.stderr.write(f"{script}: error: {e}\n")
        return 1
    print(render(result))
    return 0


# --------------------------------------------------------------------------- timing

B1_CALLS = 20  # batch-1 calls in one timed repetition


def add_speed_options(ap: argparse.ArgumentParser, stem: str) -> None:
    """--reps, --no-speed, --speed-only and --threads: how a benchmark times its rows (:func:`side_by_side`)."""
    ap.add_argument("--reps", type=int, default=5, help="Timed repetitions per batch size (median). [5]")
    ap.add_argument("--no-speed", action="store_true", help="Skip the timing (speedups null).")
    ap.add_argument("--speed-only", action="store_true",
                    help=f"Time the rows of OUT/{stem}.json again (nothing else): for a quiet machine after a "
                         "--no-speed run.")
    ap.add_argument("--threads", type=int, default=None, help="torch threads. [torch's default]")


def side_by_side(dense_call, model_call, reps: int, crop: int = 224) -> dict:
    """Speedup of ``model_call`` over ``dense_call`` (each called on a batch of random images) at batch 64
    (one call a repetition) and batch 1 (B1_CALLS calls): median seconds over ``reps`` repetitions, the two
    timed in turn after one warm-up call each."""
    import statistics

    import torch

    out = {}
    with torch.inference_mode():
        for batch, calls in ((64, 1), (1, B1_CALLS)):
            x = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(batch))
            dense_call(x), model_call(x)
            times: tuple[list, list] = ([], [])
            for _ in range(reps):
                for call, ts in zip((dense_call, model_call), times):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        call(x)
                    ts.append((time.perf_counter() - t0) / calls)
            d, m = statistics.median(times[0]), statistics.median(times[1])
            out[f"speedup_b{batch}"] = round(d / m, 4)
            out[f"seconds_b{batch}"] = {"dense": round(d, 5), "model": round(m, 5)}
    return out


def timing_note(r: dict) -> list[str]:
    """The Markdown line naming the --speed-only run that timed ``r`` again, if one did."""
    if not r.get("speed_command"):
        return []
    return [f"Speedups timed again on a quiet machine: `{r['speed_command']}` ({r['speed_machine']})"]


def retime(args, script: str, stem: str, time_row, render) -> dict:
    """--speed-only: ``time_row(row, result)`` (the row's new speed keys, or None for a row not timed) for every
    row of the earlier result OUT/STEM.json, written back after each row; the rest of the result is kept."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not (out / f"{stem}.json").exists():
        raise RuntimeError(f"--speed-only times an earlier run: {out / (stem + '.json')} does not exist")
    r = json.loads((out / f"{stem}.json").read_text())
    r.update(reps=args.reps, speed_command=command(script), speed_machine=machine())
    prog = Progress(len(r["rows"]))
    for row in r["rows"]:
        new = time_row(row, r)
        if new:
            row.update(new)
            write_results(out, stem, r, render(r))
        prog.step(f"row {r['rows'].index(row) + 1}: speedup b64 {row.get('speedup_b64')}", 1)
    return r


# --------------------------------------------------------------------------- results


def write_results(out: Path, stem: str, result: dict, markdown: str, indent: int = 2) -> None:
    """OUT/STEM.json and OUT/STEM.md, each replaced whole (a run stopped half-way leaves the last rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((f"{stem}.json", json.dumps(result, indent=indent) + "\n"), (f"{stem}.md", markdown)):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


class Progress:
    """Work done in units the caller chooses (an image-pass, say), with elapsed time and ETA on stderr."""

    def __init__(self, total: float):
        self.total, self.done, self.t0 = total, 0.0, time.perf_counter()

    def step(self, what: str, work: float) -> None:
        self.done += work
        spent = time.perf_counter() - self.t0
        eta = spent / self.done * (self.total - self.done) if self.done else math.nan
        print(f"[{100 * self.done / self.total:5.1f}%] {what}  elapsed {spent / 60:.1f} min, ETA {eta / 60:.1f} min",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- photos


def spread(items: list, n: int | None) -> list:
    """At most ``n`` of ``items``, evenly spaced (all of them for None)."""
    return items if n is None else items[:: max(1, len(items) // n)][:n]


def photos() -> list[Path]:
    """Every photo of ../shared/real/imagenette-val, sorted by path (3925)."""
    return sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in SUFFIXES)


def held_out(paths: list[Path], limit: int | None) -> list[int]:
    """The scored photos: index % 4 == 0 (982), at most ``limit`` of them, evenly spaced."""
    return spread([i for i in range(len(paths)) if i % 4 == 0], limit)


def train_folder(paths: list[Path], classes: list[int], limit: int | None, folder: Path) -> int:
    """A flat folder of symlinks to the training photos (index % 4 != 0) of ``classes`` (no labels);
    returns how many."""
    names = {SYNSETS[c] for c in classes}
    idx = spread([i for i in range(len(paths)) if i % 4 and paths[i].parent.name in names], limit)
    folder.mkdir(parents=True)
    for i in idx:
        (folder / f"{i:05d}_{paths[i].name}").symlink_to(paths[i])
    return len(idx)


def class_numbers(paths: list[Path], idx: list[int]) -> list[int]:
    """The class number (0..9 in synset order) of each photo ``idx``."""
    return [SYNSETS.index(paths[i].parent.name) for i in idx]


def labels_of(paths: list[Path], idx: list[int]) -> "torch.Tensor":
    """The ImageNet-1k label of each photo ``idx``."""
    import torch

    return torch.tensor([SYNSET_INDEX[paths[i].parent.name] for i in idx])


def seen_mask(paths: list[Path], idx: list[int], classes: list[int]) -> "torch.Tensor":
    """True for each photo ``idx`` of one of ``classes``."""
    import torch

    return torch.tensor([c in classes for c in class_numbers(paths, idx)])


# --------------------------------------------------------------------------- the dense reference and scoring


def dense_model(headless: bool = False):
    """The real DeiT-Tiny (timm), in eval mode; ``headless``: num_classes=0, the class-token embedding after
    the final norm (timm's pre-logits)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0 if headless else 1000)
    weights = load_file(str(WEIGHTS))
    if headless:
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def eval_transform(model, size: int | None = None):
    """The timm model's own eval preprocessing (DeiT: bicubic resize, center crop 0.9), at ``size`` px."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    if size is not None:
        cfg["input_size"] = (3, size, size)
    return timm.data.create_transform(**cfg)


def image_batches(paths: list[Path], idx: list[int], model, size: int | None = None, batch: int = 64):
    """The photos ``idx`` through :func:`eval_transform`, in float32 batches, decoded as they are asked for."""
    import torch
    from PIL import Image

    tf = eval_transform(model, size)
    for s in range(0, len(idx), batch):
        yield torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in idx[s:s + batch]])


def cached_images(paths: list[Path], idx: list[int], model, size: int | None = None,
                  batch: int = 64) -> list["torch.Tensor"]:
    """:func:`image_batches` decoded once and kept, in float16 (982 photos at 224 px: 300 MB)."""
    return [x.half() for x in image_batches(paths, idx, model, size, batch)]


def outputs(model, cached) -> "torch.Tensor":
    """The model's output (logits, or a headless model's embedding) on every cached batch, float32."""
    import torch

    with torch.inference_mode():
        return torch.cat([model.eval()(x.float()).float() for x in cached])


def score(logits, dense_logits, labels, mask) -> dict:
    """1000-way top-1, agreement with the dense model's top-1 and KL(dense || model) on the photos of ``mask``."""
    import torch.nn.functional as F

    lg, dl, y = logits[mask], dense_logits[mask], labels[mask]
    pred, dpred = lg.argmax(-1), dl.argmax(-1)
    kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(dl, -1), reduction="none", log_target=True).sum(-1)
    n = int(mask.sum())
    return {"photos": n, "top1": 100.0 * float((pred == y).float().mean()), "agreement":
            100.0 * float((pred == dpred).float().mean()), "kl": float(kl.mean()),
            "top1_correct": int((pred == y).sum()),
            "agree_count": int((pred == dpred).sum()), "dense_top1": 100.0 * float((dpred == y).float().mean())}


def fmt_score(s: dict | None) -> str:
    """A :func:`score` as the tables show it: top-1 / agreement / KL (photos)."""
    return "-" if s is None else f"{s['top1']:.2f} / {s['agreement']:.2f} / {s['kl']:.4f} ({s['photos']})"
