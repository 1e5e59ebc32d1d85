"""The ``evit`` command: parse, call the library, render."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

try:  # typer >= 0.25 carries its own copy of click
    from typer._click import exceptions as clickx
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as clickx

from . import validate
from ._version import __version__
from .config import parse_keep_rates, parse_layers
from .errors import EvitError, user_message

app = typer.Typer(
    help="Make Vision Transformers faster with EViT token reorganization (Liang et al., ICLR 2022).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # text is text: [default: ...], 'evit-cli[onnx]' and user paths print as written
    add_completion=False,
)
out = Console(markup=False, highlight=False, emoji=False)
err = Console(stderr=True, markup=False, highlight=False, emoji=False)

KEEP_HELP = "Keep rate: one for every layer (0.7) or one per layer (0.9,0.8,0.7)."
LAYERS_HELP = "1-based block numbers to reorganize in, as in the paper."
SKIP_HELP = "Skip images that cannot be decoded (and report how many) instead of stopping at the first."


def _checked(check):
    """An option callback that runs a ``validate`` check when the option is parsed, naming the option."""

    def callback(param: typer.CallbackParam, value):
        if value is None:
            return None
        return check(max(param.opts, key=len), value)

    return callback


def _keeps_text(check):
    """A check for a comma-separated option that is parsed later: refuse bad text now, keep the text."""

    def run(label: str, value: str) -> str:
        check(value, label)
        return value

    return run


POSITIVE_INT = _checked(validate.positive_int)
NON_NEGATIVE_INT = _checked(validate.non_negative_int)
POSITIVE = _checked(validate.positive)
NON_NEGATIVE = _checked(validate.non_negative)
PERCENT = _checked(validate.percent)
DEVICE = _checked(validate.device)
KEEP_RATES = _checked(_keeps_text(parse_keep_rates))
LAYERS = _checked(_keeps_text(parse_layers))
BATCHES = _checked(_keeps_text(lambda value, label: validate.int_list(label, value)))


def _train(name: str):
    """The callback of a finetune option: the same check a recipe value of that name gets."""
    return _checked(validate.TRAIN_CHECKS[name])


def _emit(result: dict, as_json: bool, *renderables) -> None:
    import json

    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        for r in renderables:
            out.print(r)


def _version(value: bool):
    if value:
        out.print(f"evit {__version__}")
        raise typer.Exit()


@app.callback(epilog="Example: evit convert deit_small_patch16_224 --no-pretrained --keep-rate 0.7 --layers 4,7,10 -o deit_s_evit")
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, show the Python traceback (also EVIT_DEBUG=1). "
                               "Taken anywhere on the command line; main() reads it before parsing."),
):
    """Make Vision Transformers faster with EViT token reorganization.

    Every command takes --help (with an example) and --json. Bad input is one line on stderr, exit code 2.
    """


@app.command(epilog="Example: evit convert deit_small_patch16_224 --keep-rate 0.7 --layers 4,7,10 -o deit_s_evit")
def convert(
    model: str = typer.Argument(..., help="timm name, hub id (google/vit-base-patch16-224, hf-hub:timm/...), local folder, or an exported folder."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", callback=KEEP_RATES, help=KEEP_HELP + " [default: 0.7, or an exported folder's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="Fuse the inattentive tokens into one token, or drop them. [default: fuse, or an exported folder's own]", show_default=False),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="Download pretrained weights, or start from random ones (not for an exported folder). [default: pretrained]", show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights (.safetensors, .pth, .pt, .bin) for MODEL (not for an exported folder)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", callback=POSITIVE_INT, help="Classifier size (not for an exported folder). [default: the model's or the checkpoint's]"),
    img_size: Optional[int] = typer.Option(None, "--img-size", callback=POSITIVE_INT, help="Run at this resolution, a multiple of the patch size (position embeddings interpolated)."),
    match_macs: Optional[int] = typer.Option(None, "--match-macs", callback=POSITIVE_INT, help="Pick the keep rate whose MACs come closest to the dense model at this resolution, without exceeding them."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder to write (default: MODEL_evit)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder if it exists."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload the folder to this hub repo (org/name)."),
    layout: Optional[str] = typer.Option(None, "--layout", help="timm models: timm (its own) or transformers (TimmWrapper: loads with transformers' AutoModel* and trust_remote_code, without evit). [default: the model's own]", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    attn_implementation: Optional[str] = typer.Option(None, "--attn-implementation", help="transformers models: eager or sdpa attention (default: the model's own)."),
):
    """Inject EViT into a ViT and export it: model.safetensors + evit.json."""
    from . import adapters, artifact, core, fsutil, loading
    from .bench import model_summary
    from .config import DEFAULT_LAYERS
    from .macs import match_macs as match_macs_fn
    from .report import kv_table

    output = output or Path(f"{Path(model).name}_evit")
    fsutil.check_output_dir(output, overwrite)
    artifact.check_layout(layout)
    if match_macs is not None and keep_rate is not None:
        raise EvitError("--match-macs picks the keep rate: drop --keep-rate, or drop --match-macs")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    m = loading.load_model(model, pretrained=_pretrained(model, pretrained), checkpoint=checkpoint,
                           attn_implementation=attn_implementation, **kwargs)
    if img_size is not None:
        validate.image_size("--img-size", m, img_size)
        adapters.get_adapter(m).set_img_size(m, img_size)
    if match_macs is not None:
        validate.image_size("--match-macs", m, match_macs)
        old = core.get_config(m)
        match_macs_fn(m, match_macs, layers or (old.layers if old else DEFAULT_LAYERS), fuse if fuse is not None else True)
    else:
        core.convert_keeping(m, keep_rate, layers, fuse)
    summary = model_summary(m)
    if match_macs is not None:
        summary["matched_to"] = f"dense @{match_macs}px"
    artifact.save(m, output, overwrite=overwrite, extra={"gmacs_dense": summary["gmacs_dense"], "gmacs": summary["gmacs_evit"]},
                  layout=layout)
    summary["output"] = str(output)
    if push_to_hub:
        summary["hub_url"] = artifact.push_to_hub(output, push_to_hub)
    _emit(summary, as_json, kv_table(f"converted -> {output}", summary))


@app.command(name="bench", epilog="Example: evit bench deit_s_evit --batch 256 --report reports/")
def bench_cmd(
    model: str = typer.Argument(..., help="Exported folder, or anything `evit convert` takes (converted on the fly)."),
    batch: int = typer.Option(256, "--batch", "-b", callback=POSITIVE_INT, help="Batch size for throughput."),
    device: str = typer.Option("cpu", "--device", callback=DEVICE, help="cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp", help="Autocast: bf16 on CPU, fp16 on CUDA."),
    compile_: bool = typer.Option(False, "--compile", help="Also time both models under torch.compile, beside the eager ones."),
    compile_mode: Optional[str] = typer.Option(None, "--compile-mode", help="torch.compile mode (implies --compile): default, reduce-overhead (CUDA graphs), max-autotune. [default: default]", show_default=False),
    train: bool = typer.Option(False, "--train", help="Also time a training step (forward, backward, AdamW) of both models."),
    onnx: bool = typer.Option(False, "--onnx", help="Also export both models to ONNX and time them in ONNX Runtime (CPU, torch's thread count), side by side."),
    warmup: int = typer.Option(2, "--warmup", callback=NON_NEGATIVE_INT, help="Untimed passes first (compiling happens here)."),
    reps: int = typer.Option(10, "--reps", callback=POSITIVE_INT, help="Timed passes per model (batch-1 latency takes 3x as many)."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", callback=KEEP_RATES, help=KEEP_HELP + " [default: 0.7, or an exported folder's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    report: Optional[Path] = typer.Option(None, "--report", help="Write bench.json and bench.md here (an exported folder gets them inside it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Dense vs EViT side by side: images/s, latency (batch and batch 1), GMACs, tokens, speedup.

    A model name is built with random weights: weights do not change the speed.
    """
    from .artifact import META_FILE
    from .bench import bench, compile_mode_of
    from .device import resolve_device
    from .fsutil import check_report_dir
    from .report import bench_table, write_bench

    if report is None and (Path(model) / META_FILE).is_file():
        report = Path(model)
    if report is not None:
        check_report_dir(report)
    resolve_device(device)
    mode = compile_mode_of(compile_mode or compile_)
    m = _load_converted(model, keep_rate, layers, pretrained=None if (Path(model) / META_FILE).is_file() else False)
    result = bench(m, batch=batch, device=device, amp=amp, compile=mode or False, train=train, onnx=onnx, warmup=warmup,
                   reps=reps, progress=True)
    if report is not None:
        result["report_files"] = [str(p) for p in write_bench(result, report)]
    _emit(result, as_json, bench_table(result))


@app.command(epilog="Example: evit finetune deit_t_evit --dataset ./my_photos --epochs 1 -o deit_t_recovered")
def finetune(
    model: Optional[str] = typer.Argument(None, help="Anything `evit convert` takes, or an exported folder. [default: the recipe's]", show_default=False),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Hub name, image folder (class per subfolder), save_to_disk folder, or parquet."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder: checkpoints while training, the exported model at the end."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe (see recipes/); flags override it."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", callback=KEEP_RATES, help=KEEP_HELP + " [default: 0.7, or the model's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or the model's own]"),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="Fuse or drop the inattentive tokens.", show_default=False),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="Start from pretrained weights. [default: pretrained]", show_default=False),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    head: Optional[str] = typer.Option(None, "--head", callback=_train("head"), help="auto: keep the model's head when the data set's classes map onto its classes (ImageNet synset folders onto a 1000-class model, names in id2label) or there are no labels, else a new one; keep; new. [default: auto]"),
    img_size: Optional[int] = typer.Option(None, "--img-size", callback=_train("img_size"), help="Train and export at this resolution (position embeddings interpolated)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="[default: train]"),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="[default: validation/val/test if present, else carved from train]"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", callback=_train("val_fraction"), help="Share of train held out (seeded) when there is no validation split. [default: 0.1]"),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="[default: found automatically]"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="[default: found automatically]"),
    streaming: Optional[bool] = typer.Option(None, "--streaming/--no-streaming", help="Stream the data set instead of memory-mapping it.", show_default=False),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", callback=_train("steps_per_epoch"), help="Optimizer steps per epoch (needed with --streaming)."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=_train("workers"), help="DataLoader workers per process. [default: 2]"),
    randaugment: Optional[str] = typer.Option(None, "--randaugment", callback=_train("randaugment"), help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1. [default: off: random-resized crop and flip only]"),
    color_jitter: Optional[float] = typer.Option(None, "--color-jitter", callback=_train("color_jitter"), help="[default: 0]"),
    mixup: Optional[float] = typer.Option(None, "--mixup", callback=_train("mixup"), help="Mixup alpha (0 = off)."),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", callback=_train("cutmix"), help="CutMix alpha (0 = off)."),
    smoothing: Optional[float] = typer.Option(None, "--smoothing", callback=_train("smoothing"), help="Label smoothing of the label term (none without labels). [default: 0.1]"),
    epochs: Optional[float] = typer.Option(None, "--epochs", callback=_train("epochs"), help="[default: 2]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", callback=_train("batch_size"), help="Per process. [default: 32]"),
    lr: Optional[float] = typer.Option(None, "--lr", callback=_train("lr"), help="Peak learning rate. [default: 5e-5, or --lr-per-512 x global batch / 512]"),
    lr_per_512: Optional[float] = typer.Option(None, "--lr-per-512", callback=_train("lr_per_512"), help="Learning rate per 512 images of global batch (the paper's recipes: 2e-5)."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", callback=_train("min_lr"), help="End of the cosine; clamped to the peak. [default: 1e-6]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", callback=_train("weight_decay"), help="[default: 0.05]"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", callback=_train("warmup_epochs"), help="Learning-rate warm-up. [default: 0]"),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", callback=_train("clip_grad"), help="Gradient norm clipping (off by default)."),
    accum_steps: Optional[int] = typer.Option(None, "--accum-steps", callback=_train("accum_steps"), help="Gradient accumulation. [default: 1]"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (bf16 where supported, else fp16).", show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", callback=_train("seed"), help="[default: 0]"),
    device: Optional[str] = typer.Option(None, "--device", callback=_train("device"), help="[default: cuda when available, else cpu]"),
    shrink_start: Optional[float] = typer.Option(None, "--shrink-start", callback=_train("shrink_start"), help="Epochs at keep rate 1.0 first. [default: 0]"),
    shrink_epochs: Optional[float] = typer.Option(None, "--shrink-epochs", callback=_train("shrink_epochs"), help="Epochs of cosine from 1.0 to the target. [default: 0]"),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill", help="Distil from the dense model before conversion (KL to its distribution). [default: whenever its classes fit; always without labels]", show_default=False),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Another teacher model (implies --distill)."),
    oracle: Optional[bool] = typer.Option(None, "--oracle/--no-oracle", help="While training, keep the tokens the teacher's class attention ranks highest (the paper's oracle; the teacher: --teacher, or the dense model before conversion). At inference the model chooses by its own attention. [default: no-oracle]", show_default=False),
    distill_alpha: Optional[float] = typer.Option(None, "--distill-alpha", callback=_train("distill_alpha"), help="Weight of the KL term against the label term (without labels the KL is the whole loss). [default: 0.5]"),
    distill_tau: Optional[float] = typer.Option(None, "--distill-tau", callback=_train("distill_tau"), help="Temperature. [default: 1.0]"),
    save_every: Optional[int] = typer.Option(None, "--save-every", callback=_train("save_every"), help="Also checkpoint every N optimizer steps. [default: end of epoch only]"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", callback=_train("checkpoint_dir"), help="Where the training checkpoint goes. [default: OUTPUT.train, beside the export]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output after a crash or a kill."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    bench_report: Optional[bool] = typer.Option(None, "--bench/--no-bench", help="Benchmark the trained model at the end. [default: bench]", show_default=False),
    bench_batch: Optional[int] = typer.Option(None, "--bench-batch", callback=_train("bench_batch"), help="[default: 32]"),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help=SKIP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON on stdout."),
):
    """Fine-tune the EViT model on a data set with the cosine keep-rate schedule.

    The defaults are the recovery recipe (recipes/recover.yaml): distil from the dense model before conversion, AdamW lr 5e-5, weight decay 0.05, batch 32, random-resized crop and flip, cosine, 2 epochs. Labels are optional: a flat folder of your own photos wins back what EViT costs.

    Under torchrun (torchrun --nproc_per_node 8 -m evit_cli finetune ...) it trains data-parallel.
    """
    flags = dict(locals())
    from . import data
    from .train import TrainConfig, finetune as run, load_recipe

    for k in ("recipe", "as_json", "bench_report", "skip_bad_images"):
        flags.pop(k)
    flags["bench"] = bench_report
    flags["resume"] = resume or None
    flags["overwrite"] = overwrite or None
    cfg = TrainConfig.merged(load_recipe(recipe) if recipe else None, flags)
    validate.train_config(cfg)
    if not cfg.model:
        raise EvitError("no model: give MODEL or a --recipe that names one")
    _pretrained(cfg.model, pretrained)
    if not cfg.dataset:
        raise EvitError("no data set: give --dataset (a hub name, an image folder, a save_to_disk folder or parquet)")
    if not cfg.output:
        raise EvitError("no output folder: give -o/--output")
    _check_run_folder(Path(cfg.output))
    from .report import kv_table

    data.BAD_IMAGES.reset(skip_bad_images)
    result = _removing_if_unresumable(cfg, lambda: run(cfg, console=err))
    if skip_bad_images:
        result["skipped_images"] = data.BAD_IMAGES.count
    if int(os.environ.get("RANK", "0")) == 0:
        _emit(result, as_json, kv_table(f"fine-tuned -> {cfg.output}", result))


def _check_run_folder(output: Path) -> None:
    """A training output folder: a folder (or nothing yet) in a place we can write to."""
    from .fsutil import check_writable

    if output.exists() and not output.is_dir():
        raise EvitError(f"output {output} exists and is not a folder: choose another -o")
    check_writable(output if output.is_dir() else output.parent)


def _removing_if_unresumable(cfg, work):
    """Run ``work``; if it fails before the first checkpoint, remove the folders it created
    (nothing there could be resumed), so that a failed start leaves nothing behind."""
    import shutil

    from .checkpoint import CHECKPOINT
    from .train import run_folders

    output, train_dir = run_folders(cfg)
    created = [p for p in (output, train_dir) if not p.exists()]
    try:
        return work()
    except BaseException:
        if not (train_dir / CHECKPOINT).is_file():
            for p in created:
                shutil.rmtree(p, ignore_errors=True)
        raise


def _pretrained(model: str, value: Optional[bool]) -> bool:
    """--pretrained/--no-pretrained as given; refused for an exported folder, whose weights are its own."""
    from .artifact import META_FILE

    if value is not None and (Path(model) / META_FILE).is_file():
        flag = "--pretrained" if value else "--no-pretrained"
        raise EvitError(f"{model} is an exported folder, which holds its own weights: drop {flag}, or give the original model name")
    return True if value is None else value


def _load_converted(model: str, keep_rate, layers, fuse=None, pretrained: Optional[bool] = None, checkpoint=None):
    """An EViT model from a folder (its own settings unless given) or a name (converted with them)."""
    from . import core, loading

    m = loading.load_model(model, pretrained=_pretrained(model, pretrained), checkpoint=checkpoint)
    return core.convert_keeping(m, keep_rate, layers, fuse)


def _data(dataset: str, split: Optional[str], image_column, label_column):
    from .data import load_image_data

    return load_image_data(dataset, val_split=split, image_column=image_column, label_column=label_column,
                           whole_if_no_val=True)


@app.command(name="eval", epilog="Example: evit eval deit_t_evit --dataset ../shared/real/imagenette-val --json")
def eval_cmd(
    model: str = typer.Argument(..., help="Exported folder, or a model `evit convert` takes (converted with -k/-l)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Hub name, image folder, save_to_disk folder or parquet."),
    split: Optional[str] = typer.Option(None, "--split", help="[default: validation/val/test if present, else all of train]"),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", callback=KEEP_RATES, help=KEEP_HELP + " [default: 0.7, or an exported folder's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="For a model name (not for an exported folder). [default: pretrained]", show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL (not for an exported folder)."),
    batch: int = typer.Option(64, "--batch", "-b", callback=POSITIVE_INT, help="Batch size for evaluation and throughput."),
    limit: Optional[int] = typer.Option(None, "--limit", callback=POSITIVE_INT, help="Evaluate on a seeded sample of N images. [default: all]"),
    workers: int = typer.Option(2, "--workers", callback=NON_NEGATIVE_INT, help="DataLoader workers."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="[default: found automatically]"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="[default: found automatically]"),
    device: str = typer.Option("cpu", "--device", callback=DEVICE, help="cpu, cuda or cuda:N."),
    reps: int = typer.Option(5, "--reps", callback=POSITIVE_INT, help="Timed passes per model for throughput."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write eval.json into this folder."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help=SKIP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Dense vs EViT on the same images: agreement and KL(dense || EViT) on any image folder, top-1/top-5 with labels, throughput.

    A flat folder of images has no labels. ImageNet synset folder names (n01440764, ...) map to a 1000-class model's classes. A headless model reports the cosine similarity of the embeddings.
    """
    from .bench import bench
    from .device import resolve_device
    from .core import dense_copy
    from .data import BAD_IMAGES, sample_size
    from .evaluate import evaluate_models
    from .fsutil import check_report_dir, write_json
    from .progress import Progress
    from .report import eval_table

    if report is not None:
        check_report_dir(report)
    dev = resolve_device(device)
    m = _load_converted(model, keep_rate, layers, pretrained=pretrained, checkpoint=checkpoint).to(dev)
    BAD_IMAGES.reset(skip_bad_images)
    data = _data(dataset, split, image_column, label_column)
    with Progress() as p, p.task("eval dense and EViT", sample_size(data.val, limit), unit="images") as advance:
        acc = evaluate_models({"dense": dense_copy(m), "evit": m}, data, batch_size=batch, workers=workers, limit=limit,
                              device=dev, progress=advance)
    speed = bench(m, batch=batch, device=device, reps=reps, warmup=1, progress=True)
    result = {"model": speed["model"], "dataset": dataset, "images": acc["evit"]["images"], "evit": speed["evit"],
              "labelled": data.labelled, "training": getattr(m, "evit_training", None),
              "dense": {**acc["dense"], "gmacs": speed["dense"]["gmacs"], "images_per_s": speed["dense"]["images_per_s"]},
              "evit_model": {**acc["evit"], "gmacs": speed["evit_model"]["gmacs"], "images_per_s": speed["evit_model"]["images_per_s"]},
              "speedup": speed["speedup"], "batch": batch, "device_name": speed["device_name"]}
    if skip_bad_images:
        result["skipped_images"] = BAD_IMAGES.count
    if report is not None:
        result["report_files"] = [str(write_json(Path(report) / "eval.json", result))]
    _emit(result, as_json, eval_table(result))




@app.command(epilog="Example: evit sweep deit_small_patch16_224 --no-pretrained --keep-rates 0.5,0.6,0.7,0.8,0.9,1.0 -o sweep/")
def sweep(
    model: str = typer.Argument(..., help="A model `evit convert` takes, or an exported folder (its layers are used)."),
    keep_rates: str = typer.Option("0.5,0.6,0.7,0.8,0.9,1.0", "--keep-rates", callback=KEEP_RATES, help="Keep rates to compare."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Also measure accuracy on this data set."),
    split: Optional[str] = typer.Option(None, "--split", help="[default: validation/val/test if present, else all of train]"),
    limit: Optional[int] = typer.Option(None, "--limit", callback=POSITIVE_INT, help="Evaluate on a seeded sample of N images. [default: all]"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="For a model name (not for an exported folder). [default: pretrained]", show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL (not for an exported folder)."),
    batch: int = typer.Option(64, "--batch", "-b", callback=POSITIVE_INT, help="Batch size for timing and evaluation."),
    reps: int = typer.Option(5, "--reps", callback=POSITIVE_INT, help="Timed passes per model."),
    device: str = typer.Option("cpu", "--device", callback=DEVICE, help="cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, "--workers", callback=NON_NEGATIVE_INT, help="DataLoader workers."),
    output: Path = typer.Option(Path("sweep"), "--output", "-o", help="Folder for sweep.json, sweep.md and sweep.png."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help=SKIP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """For each keep rate: GMACs, images/s, speedup (timed side by side), accuracy with --dataset; table, JSON, PNG plot."""
    from .device import resolve_device
    from .data import BAD_IMAGES
    from .sweep import plot_sweep, sweep as run
    from .fsutil import check_report_dir, write_json, write_text
    from .progress import Progress
    from .report import sweep_markdown, sweep_table

    if skip_bad_images and not dataset:
        raise EvitError("--skip-bad-images is about the images of --dataset: give --dataset, or drop it")
    check_report_dir(output)
    resolve_device(device)
    m = _load_converted(model, 1.0, layers, pretrained=pretrained, checkpoint=checkpoint)
    BAD_IMAGES.reset(skip_bad_images)
    data = _data(dataset, split, None, None) if dataset else None
    with Progress() as p:
        result = run(m, list(parse_keep_rates(keep_rates)), data=data, batch=batch, reps=reps, device=device,
                     limit=limit, workers=workers, progress=p)
    if skip_bad_images:
        result["skipped_images"] = BAD_IMAGES.count
    result["model"] = (getattr(m, "evit_source", {}) or {}).get("model", model)
    files = [write_json(output / "sweep.json", result), write_text(output / "sweep.md", sweep_markdown(result)),
             plot_sweep(result, output / "sweep.png", f"{result['model']}: EViT keep-rate sweep")]
    result["report_files"] = [str(f) for f in files]
    _emit(result, as_json, sweep_table(result))


@app.command(epilog="Example: evit search deit_small_patch16_224 --no-pretrained --target-gmacs 3.0 --search-layers")
def search(
    model: str = typer.Argument(..., help="A model `evit convert` takes, or an exported folder."),
    target_gmacs: Optional[float] = typer.Option(None, "--target-gmacs", callback=POSITIVE, help="Counted GMACs per image to stay within."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", callback=POSITIVE, help="Measured speedup over dense to reach."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    search_layers: bool = typer.Option(False, "--search-layers", help="Also choose among sensible layer sets (by accuracy: any block from 2 on)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Images for --max-drop/--min-agreement (labelled or a flat folder); with a GMACs/speedup target, the found setting's fidelity on them."),
    split: Optional[str] = typer.Option(None, "--split", help="[default: validation/val/test if present, else all of train]"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", callback=NON_NEGATIVE, help="Fastest setting whose top-1 stays within this many points of the dense model's (needs labels)."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", callback=PERCENT, help="Fastest setting that agrees with the dense model's top-1 on at least this % of images (no labels needed)."),
    limit: int = typer.Option(256, "--limit", callback=POSITIVE_INT, help="Calibration sample: this many images (seeded)."),
    workers: int = typer.Option(2, "--workers", callback=NON_NEGATIVE_INT, help="DataLoader workers."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="For a model name (not for an exported folder). [default: pretrained]", show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL (not for an exported folder)."),
    batch: int = typer.Option(64, "--batch", "-b", callback=POSITIVE_INT, help="Batch for timing."),
    reps: int = typer.Option(3, "--reps", callback=POSITIVE_INT, help="Timed passes per model and candidate."),
    device: str = typer.Option("cpu", "--device", callback=DEVICE, help="cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """The cheapest EViT setting that meets a target, and the convert command for it.

    --target-gmacs/--target-speedup: the largest keep rate (and layer set). --max-drop/--min-agreement with --dataset: layer set and per-layer keep rates, by a greedy search on counted GMACs within the accuracy constraint.
    """
    from . import adapters
    from .device import resolve_device
    from .search import candidate_layer_sets, search as run, search_fidelity
    from .progress import Progress
    from .report import kv_table

    accuracy = max_drop is not None or min_agreement is not None
    if accuracy and (target_gmacs is not None or target_speedup is not None):
        raise EvitError("give an accuracy constraint or a GMACs/speedup target, not both")
    if accuracy and max_drop is not None and min_agreement is not None:
        raise EvitError("give one accuracy constraint: --max-drop (labels) or --min-agreement (no labels needed)")
    if not accuracy and (target_gmacs is None) == (target_speedup is None):
        raise EvitError("give one target: --target-gmacs or --target-speedup (or --max-drop/--min-agreement with --dataset)")
    if accuracy and dataset is None:
        raise EvitError("--max-drop/--min-agreement need --dataset: the images to measure on")
    if search_layers and layers:
        raise EvitError("--search-layers chooses the layers: drop --layers, or drop --search-layers")
    resolve_device(device)
    m = _load_converted(model, 1.0, layers, pretrained=pretrained, checkpoint=checkpoint)
    data = _data(dataset, split, None, None) if dataset else None
    if max_drop is not None or min_agreement is not None:
        from .search import search_by_accuracy

        result = search_by_accuracy(m, data, max_drop=max_drop, min_agreement=min_agreement, limit=limit,
                                    search_layers=search_layers, batch=batch, device=device, workers=workers)
    else:
        sets = candidate_layer_sets(adapters.get_adapter(m).depth(m)) if search_layers else None
        with Progress() as p:
            result = run(m, target_gmacs=target_gmacs, target_speedup=target_speedup, layer_sets=sets, batch=batch,
                         reps=reps, device=device, progress=p)
        if data is not None:
            result["fidelity"] = search_fidelity(m, data, limit=limit, batch=batch, workers=workers, device=device)
    src = getattr(m, "evit_source", {}) or {}
    rates = result.get("keep_rates") or [result["keep_rate"]]
    parts = ["evit convert", shlex.quote(model), "--keep-rate " + ",".join(f"{r:g}" for r in rates),
             "--layers " + ",".join(map(str, result["layers"]))]
    if pretrained is False:
        parts.append("--no-pretrained")
    if checkpoint:
        parts.append(f"--checkpoint {shlex.quote(str(checkpoint))}")
    if not result["fuse"]:
        parts.append("--no-fuse")
    result["model"] = src.get("model", model)
    result["command"] = " ".join(parts)
    _emit(result, as_json, kv_table("evit search", {k: v for k, v in result.items() if k != "command"}))
    if not as_json:
        out.print(f"\nReproduce with:\n  {result['command']}", soft_wrap=True)


@app.command(epilog="Example: evit visualize deit_t_evit photo1.jpg photo2.jpg -o tokens.png")
def visualize(
    model: str = typer.Argument(..., help="Exported folder, or a model `evit convert` takes (converted with -k/-l)."),
    images: list[Path] = typer.Argument(..., help="Image files (any size: resized with the model's transform)."),
    output: Path = typer.Option(Path("evit_tokens.png"), "--output", "-o", help="PNG to write."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", callback=KEEP_RATES, help=KEEP_HELP + " [default: 0.7, or an exported folder's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", callback=LAYERS, help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="For a model name (not for an exported folder). [default: pretrained]", show_default=False),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL (not for an exported folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Which patches each EViT layer kept and which it fused: one panel per layer, fused patches blanked.

    A panel blanks every patch that no longer has a token of its own after that layer.
    """
    from .visualize import visualize as run
    from .fsutil import check_output_file
    from .report import kv_table

    check_output_file(output)
    m = _load_converted(model, keep_rate, layers, pretrained=pretrained, checkpoint=checkpoint)
    result = run(m, [str(p) for p in images], output)
    _emit(result, as_json, kv_table(f"wrote {output}", {k: v for k, v in result.items() if k != "images"}))


@app.command(name="export", epilog="Example: evit export deit_s_evit --format onnx")
def export_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `evit convert` or `evit finetune`."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript (safetensors is what convert writes)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. [default: FOLDER/model.onnx or FOLDER/model.torchscript.pt]"),
    check_batches: str = typer.Option("1,8", "--check-batches", callback=BATCHES, help="Batch sizes the written file is run at and compared with PyTorch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Export the EViT model to ONNX or TorchScript: fixed token counts, dynamic batch, checked after export."""
    from . import artifact
    from .export import FORMATS, export
    from .fsutil import check_output_file
    from .report import kv_table

    if fmt not in FORMATS:
        raise EvitError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    batches = validate.int_list("--check-batches", check_batches)
    artifact.read_meta(folder)
    target = check_output_file(output or folder / FORMATS[fmt], overwrite)
    model = artifact.load(folder)
    result = export(model, fmt, target, check_batches=batches, overwrite=overwrite)
    _emit(result, as_json, kv_table(f"exported {fmt}", result))


@app.command(epilog="Example: evit info deit_s_evit")
def info(
    folder: Path = typer.Argument(..., help="A folder written by `evit convert` or `evit finetune`, or its hub repo (org/name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """What an exported folder holds: source, layers, keep rates, token counts, GMACs, metrics if trained."""
    from . import artifact
    from .fsutil import read_json
    from .report import kv_table

    folder = artifact.locate(str(folder))
    meta = artifact.read_meta(folder)
    e = meta.get("evit") or {}
    src = meta["source"]
    result = {
        "folder": str(folder), "family": meta["family"], "source": src.get("model"),
        "weights": artifact.weights_of(meta), "training": artifact.training_summary(meta),
        "num_classes": meta["num_classes"], "img_size": meta["img_size"], "layers": e.get("layers"),
        "keep_rates": e.get("keep_rates"), "fuse": e.get("fuse"),
        "tokens": [meta["num_tokens"]] + list(meta.get("token_counts") or []),
        "gmacs_dense": meta.get("gmacs_dense"), "gmacs": meta.get("gmacs"), "tool_version": meta["tool_version"],
    }
    metrics, bench = Path(folder) / "metrics.json", Path(folder) / "bench.json"
    if metrics.is_file():
        data = read_json(metrics, "metrics (evit finetune)")
        result["metrics"] = {k: data[k] for k in ("agreement", "kl", "top1", "top5", "val_loss", "epoch", "split") if k in data}
    if bench.is_file():
        data = read_json(bench, "benchmark (evit bench)")
        result["bench"] = {name: data[k] for name, k in (("speedup", "speedup"), ("batch", "batch"), ("device", "device_name"))
                           if k in data}
    _emit(result, as_json, kv_table(f"evit info {folder}", {k: v for k, v in result.items() if v is not None}))


def _say(text: str) -> None:
    """One line on stderr, whatever the message holds."""
    sys.stderr.write(" ".join(line.strip() for line in str(text).splitlines() if line.strip()) + "\n")
    sys.stderr.flush()


def _usage_line(e: clickx.UsageError) -> str:
    where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
    return f"error: {e.format_message()}{where}"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every `finally` removes its temp files


def _run(args: list[str], debug: bool) -> int:
    """Run the app on ``args``; every way it can end becomes an exit code and at most one stderr line."""
    try:
        rv = app(args=args, prog_name="evit", standalone_mode=False)
    except clickx.NoArgsIsHelpError as e:
        out.print(e.format_message(), soft_wrap=True)
        return 0
    except clickx.UsageError as e:
        if debug:
            raise
        _say(_usage_line(e))
        return 2
    except clickx.ClickException as e:
        _say(f"error: {e.format_message()}")
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _say("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the error boundary: nothing reaches the user as a traceback
        if debug:
            raise
        message = user_message(e)
        if message is not None:
            _say(f"error: {message}")
            return 2
        first = (str(e).strip().splitlines() or [""])[0][:200]
        _say(f"error: unexpected {type(e).__name__}{': ' + first if first else ''}. This is a bug in evit: run "
             "again with --debug (or EVIT_DEBUG=1) for the traceback, and please report it")
        return 1
    if rv == 130:  # typer turns Ctrl-C into exit code 130
        _say("interrupted")
    return rv if isinstance(rv, int) else 0


def main(argv: Optional[list[str]] = None) -> None:
    """The `evit` command: one error boundary around the whole app."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EVIT_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        code = _run(args, debug)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


if __name__ == "__main__":
    main()
