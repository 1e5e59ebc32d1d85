"""The ``evit`` command: parse, call the library, render."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from .errors import EvitError

app = typer.Typer(
    help="Make Vision Transformers faster with EViT token reorganization (Liang et al., ICLR 2022).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

KEEP_HELP = "Keep rate: one for every layer (0.7) or one per layer (0.9,0.8,0.7)."
LAYERS_HELP = "1-based block numbers to reorganize in, as in the paper."


def _emit(result: dict, as_json: bool, *renderables) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        for r in renderables:
            out.print(r)


def _version(value: bool):
    if value:
        out.print(f"evit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Make Vision Transformers faster with EViT token reorganization.

    [bold]Example[/bold]: evit convert deit_small_patch16_224 --keep-rate 0.7 --layers 4,7,10 -o deit_s_evit
    """


@app.command(epilog="Example: evit convert deit_small_patch16_224 --keep-rate 0.7 --layers 4,7,10 -o deit_s_evit")
def convert(
    model: str = typer.Argument(..., help="timm name, hub id (google/vit-base-patch16-224, hf-hub:timm/...), local folder, or an exported folder."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", help=KEEP_HELP + " [default: 0.7, or an exported folder's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="Fuse the inattentive tokens into one token, or drop them. [default: fuse, or an exported folder's own]", show_default=False),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="Download pretrained weights, or start from random ones."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights (.safetensors, .pth, .pt, .bin) for MODEL."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier size (default: the model's or the checkpoint's)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Run at this resolution (position embeddings interpolated)."),
    match_macs: Optional[int] = typer.Option(None, "--match-macs", help="Pick the keep rate whose MACs come closest to the dense model at this resolution, without exceeding them."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder to write (default: MODEL_evit)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder if it exists."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Also upload the folder to this hub repo (org/name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Inject EViT into a ViT and export it: model.safetensors + evit.json."""
    from . import adapters, artifact, core, fsutil, loading
    from .bench import model_summary
    from .config import DEFAULT_LAYERS
    from .explore import match_macs as match_macs_fn
    from .report import kv_table

    output = output or Path(f"{Path(model).name}_evit")
    fsutil.check_output_dir(output, overwrite)
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    m = loading.load_model(model, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    if img_size is not None:
        if img_size < 1:
            raise EvitError(f"--img-size must be positive, got {img_size}")
        adapters.get_adapter(m).set_img_size(m, img_size)
    if match_macs is not None:
        if keep_rate is not None:
            raise EvitError("--match-macs picks the keep rate: drop --keep-rate, or drop --match-macs")
        old = core.get_config(m)
        match_macs_fn(m, match_macs, layers or (old.layers if old else DEFAULT_LAYERS), fuse if fuse is not None else True)
    else:
        core.convert_keeping(m, keep_rate, layers, fuse)
    summary = model_summary(m)
    if match_macs is not None:
        summary["matched_to"] = f"dense @{match_macs}px"
    artifact.save(m, output, overwrite=overwrite, extra={"gmacs_dense": summary["gmacs_dense"], "gmacs": summary["gmacs_evit"]})
    summary["output"] = str(output)
    if push_to_hub:
        summary["hub_url"] = artifact.push_to_hub(output, push_to_hub)
    _emit(summary, as_json, kv_table(f"converted -> {output}", summary))


@app.command(name="bench", epilog="Example: evit bench deit_s_evit --batch 256 --report reports/")
def bench_cmd(
    model: str = typer.Argument(..., help="Exported folder, or anything `evit convert` takes (converted on the fly)."),
    batch: int = typer.Option(256, "--batch", "-b", help="Batch size for throughput."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    amp: bool = typer.Option(False, "--amp", help="Autocast: bf16 on CPU, fp16 on CUDA."),
    compile_: bool = typer.Option(False, "--compile", help="Benchmark both models under torch.compile."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed passes first (compiling happens here)."),
    reps: int = typer.Option(10, "--reps", help="Timed passes per model (batch-1 latency takes 3x as many)."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", help=KEEP_HELP + " [default: 0.7, or an exported folder's own]"),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP + " [default: 4,7,10, or an exported folder's own]"),
    report: Optional[Path] = typer.Option(None, "--report", help="Write bench.json and bench.md here (an exported folder gets them inside it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Dense vs EViT side by side: images/s, latency (batch and batch 1), GMACs, tokens, speedup.

    A model name is built with random weights: weights do not change the speed.
    """
    from .artifact import META_FILE
    from .bench import bench
    from .report import bench_table, write_bench

    m = _load_converted(model, keep_rate, layers, pretrained=False)
    if report is None and (Path(model) / META_FILE).is_file():
        report = Path(model)
    result = bench(m, batch=batch, device=device, amp=amp, compile=compile_, warmup=warmup, reps=reps, progress=not as_json)
    if report is not None:
        result["report_files"] = [str(p) for p in write_bench(result, report)]
    _emit(result, as_json, bench_table(result))


@app.command(epilog="Example: evit finetune deit_t_evit --dataset ./my_photos --epochs 1 -o deit_t_recovered")
def finetune(
    model: Optional[str] = typer.Argument(None, help="Anything `evit convert` takes, or an exported folder. [default: the recipe's]", show_default=False),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Hub name, image folder (class per subfolder), save_to_disk folder, or parquet."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder: checkpoints while training, the exported model at the end."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe (see recipes/); flags override it."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", help=KEEP_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP),
    fuse: Optional[bool] = typer.Option(None, "--fuse/--no-fuse", help="Fuse or drop the inattentive tokens.", show_default=False),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="Start from pretrained weights. [default: pretrained]", show_default=False),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    head: Optional[str] = typer.Option(None, "--head", help="auto: keep the model's head when the data set's classes map onto its classes (ImageNet synset folders onto a 1000-class model, names in id2label) or there are no labels, else a new one; keep; new. [default: auto]"),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Train and export at this resolution (position embeddings interpolated)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="[default: train]"),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="[default: validation/val/test if present, else carved from train]"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of train held out (seeded) when there is no validation split. [default: 0.1]"),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="[default: found automatically]"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="[default: found automatically]"),
    streaming: Optional[bool] = typer.Option(None, "--streaming/--no-streaming", help="Stream the data set instead of memory-mapping it.", show_default=False),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help="Optimizer steps per epoch (needed with --streaming)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers per process. [default: 2]"),
    randaugment: Optional[str] = typer.Option(None, "--randaugment", help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1. [default: off: random-resized crop and flip only]"),
    color_jitter: Optional[float] = typer.Option(None, "--color-jitter", help="[default: 0]"),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="Mixup alpha (0 = off)."),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", help="CutMix alpha (0 = off)."),
    smoothing: Optional[float] = typer.Option(None, "--smoothing", help="Label smoothing of the label term (none without labels). [default: 0.1]"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="[default: 2]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Per process. [default: 32]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate. [default: 5e-5, or --lr-per-512 x global batch / 512]"),
    lr_per_512: Optional[float] = typer.Option(None, "--lr-per-512", help="Learning rate per 512 images of global batch (the paper's recipes: 2e-5)."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="End of the cosine; clamped to the peak. [default: 1e-6]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="[default: 0.05]"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Learning-rate warm-up. [default: 0]"),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="Gradient norm clipping (off by default)."),
    accum_steps: Optional[int] = typer.Option(None, "--accum-steps", help="Gradient accumulation. [default: 1]"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (bf16 where supported, else fp16).", show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", help="[default: 0]"),
    device: Optional[str] = typer.Option(None, "--device", help="[default: cuda when available, else cpu]"),
    shrink_start: Optional[float] = typer.Option(None, "--shrink-start", help="Epochs at keep rate 1.0 first. [default: 0]"),
    shrink_epochs: Optional[float] = typer.Option(None, "--shrink-epochs", help="Epochs of cosine from 1.0 to the target. [default: 0]"),
    distill: Optional[bool] = typer.Option(None, "--distill/--no-distill", help="Distil from the dense model before conversion (KL to its distribution). [default: whenever its classes fit; always without labels]", show_default=False),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Another teacher model (implies --distill)."),
    distill_alpha: Optional[float] = typer.Option(None, "--distill-alpha", help="Weight of the KL term against the label term (without labels the KL is the whole loss). [default: 0.5]"),
    distill_tau: Optional[float] = typer.Option(None, "--distill-tau", help="Temperature. [default: 1.0]"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Also checkpoint every N optimizer steps. [default: end of epoch only]"),
    checkpoint_dir: Optional[str] = typer.Option(None, "--checkpoint-dir", help="Where the training checkpoint goes. [default: OUTPUT.train, beside the export]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output after a crash or a kill."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    bench_report: Optional[bool] = typer.Option(None, "--bench/--no-bench", help="Benchmark the trained model at the end. [default: bench]", show_default=False),
    bench_batch: Optional[int] = typer.Option(None, "--bench-batch", help="[default: 32]"),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON on stdout."),
):
    """Fine-tune the EViT model on a data set with the cosine keep-rate schedule.

    The defaults are the recovery recipe (recipes/recover.yaml): distil from the dense model before conversion, AdamW lr 5e-5, weight decay 0.05, batch 32, random-resized crop and flip, cosine, 2 epochs. Labels are optional: a flat folder of your own photos wins back what EViT costs.

    Under torchrun (torchrun --nproc_per_node 8 -m evit_cli finetune ...) it trains data-parallel.
    """
    flags = dict(locals())
    from .train import TrainConfig, finetune as run, load_recipe

    for k in ("recipe", "as_json", "bench_report"):
        flags.pop(k)
    flags["bench"] = bench_report
    flags["resume"] = resume or None
    flags["overwrite"] = overwrite or None
    cfg = TrainConfig.merged(load_recipe(recipe) if recipe else None, flags)
    if not cfg.model:
        raise EvitError("no model: give MODEL or a --recipe that names one")
    if not cfg.dataset:
        raise EvitError("no data set: give --dataset (a hub name, an image folder, a save_to_disk folder or parquet)")
    from .report import kv_table

    result = run(cfg, console=None if as_json else err)
    if int(os.environ.get("RANK", "0")) == 0:
        _emit(result, as_json, kv_table(f"fine-tuned -> {cfg.output}", result))


def _load_converted(model: str, keep_rate, layers, fuse=None, pretrained: bool = True, checkpoint=None):
    """An EViT model from a folder (its own settings unless given) or a name (converted with them)."""
    from . import core, loading

    m = loading.load_model(model, pretrained=pretrained, checkpoint=checkpoint)
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
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", help=KEEP_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="For a model name."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    batch: int = typer.Option(64, "--batch", "-b", help="Batch size for evaluation and throughput."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate on the first N images only."),
    workers: int = typer.Option(2, "--workers", help="DataLoader workers."),
    image_column: Optional[str] = typer.Option(None, "--image-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    reps: int = typer.Option(5, "--reps", help="Timed passes per model for throughput."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write eval.json here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Dense vs EViT on the same images: agreement and KL(dense || EViT) on any image folder, top-1/top-5 with labels, throughput.

    A flat folder of images has no labels. ImageNet synset folder names (n01440764, ...) map to a 1000-class model's classes. A headless model reports the cosine similarity of the embeddings.
    """
    from .bench import bench, resolve_device
    from .core import dense_copy
    from .explore import evaluate_models
    from .fsutil import write_json
    from .report import eval_table

    if batch < 1:
        raise EvitError(f"--batch must be at least 1, got {batch}")
    dev = resolve_device(device)
    m = _load_converted(model, keep_rate, layers, pretrained=pretrained, checkpoint=checkpoint).to(dev)
    data = _data(dataset, split, image_column, label_column)
    acc = evaluate_models({"dense": dense_copy(m), "evit": m}, data, batch_size=batch, workers=workers, limit=limit, device=dev)
    speed = bench(m, batch=batch, device=device, reps=reps, warmup=1, progress=not as_json)
    result = {"model": speed["model"], "dataset": dataset, "images": acc["evit"]["images"], "evit": speed["evit"],
              "labelled": data.labelled, "training": getattr(m, "evit_training", None),
              "dense": {**acc["dense"], "gmacs": speed["dense"]["gmacs"], "images_per_s": speed["dense"]["images_per_s"]},
              "evit_model": {**acc["evit"], "gmacs": speed["evit_model"]["gmacs"], "images_per_s": speed["evit_model"]["images_per_s"]},
              "speedup": speed["speedup"], "batch": batch, "device_name": speed["device_name"]}
    if report is not None:
        result["report_files"] = [str(write_json(Path(report) / "eval.json", result))]
    _emit(result, as_json, eval_table(result))


def _rates(text: str) -> list[float]:
    from .config import parse_keep_rates

    return list(parse_keep_rates(text))


@app.command(epilog="Example: evit sweep deit_small_patch16_224 --no-pretrained --keep-rates 0.5,0.6,0.7,0.8,0.9,1.0 -o sweep/")
def sweep(
    model: str = typer.Argument(..., help="A model `evit convert` takes, or an exported folder (its layers are used)."),
    keep_rates: str = typer.Option("0.5,0.6,0.7,0.8,0.9,1.0", "--keep-rates", help="Keep rates to compare."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Also measure accuracy on this data set."),
    split: Optional[str] = typer.Option(None, "--split"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate on the first N images only."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    batch: int = typer.Option(64, "--batch", "-b"),
    reps: int = typer.Option(5, "--reps"),
    device: str = typer.Option("cpu", "--device"),
    workers: int = typer.Option(2, "--workers"),
    output: Path = typer.Option(Path("sweep"), "--output", "-o", help="Folder for sweep.json, sweep.md and sweep.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """For each keep rate: GMACs, images/s, speedup (timed side by side), accuracy with --dataset; table, JSON, PNG plot."""
    from .bench import resolve_device
    from .explore import plot_sweep, sweep as run
    from .fsutil import write_json, write_text
    from .report import sweep_markdown, sweep_table

    if batch < 1:
        raise EvitError(f"--batch must be at least 1, got {batch}")
    resolve_device(device)
    m = _load_converted(model, 1.0, layers, pretrained=pretrained, checkpoint=checkpoint)
    data = _data(dataset, split, None, None) if dataset else None
    result = run(m, _rates(keep_rates), data=data, batch=batch, reps=reps, device=device, limit=limit, workers=workers)
    result["model"] = (getattr(m, "evit_source", {}) or {}).get("model", model)
    files = [write_json(output / "sweep.json", result), write_text(output / "sweep.md", sweep_markdown(result)),
             plot_sweep(result, output / "sweep.png", f"{result['model']}: EViT keep-rate sweep")]
    result["report_files"] = [str(f) for f in files]
    _emit(result, as_json, sweep_table(result))


@app.command(epilog="Example: evit search deit_small_patch16_224 --no-pretrained --target-gmacs 3.0 --search-layers")
def search(
    model: str = typer.Argument(..., help="A model `evit convert` takes, or an exported folder."),
    target_gmacs: Optional[float] = typer.Option(None, "--target-gmacs", help="Counted GMACs per image to stay within."),
    target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="Measured speedup over dense to reach."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP),
    search_layers: bool = typer.Option(False, "--search-layers", help="Also choose among sensible layer sets (by accuracy: any block from 2 on)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Images for --max-drop/--min-agreement (labelled or a flat folder); with a GMACs/speedup target, the found setting's fidelity on them."),
    split: Optional[str] = typer.Option(None, "--split"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Fastest setting whose top-1 stays within this many points of the dense model's (needs labels)."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Fastest setting that agrees with the dense model's top-1 on at least this % of images (no labels needed)."),
    limit: int = typer.Option(256, "--limit", help="Calibration sample: this many images (seeded)."),
    workers: int = typer.Option(2, "--workers"),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    batch: int = typer.Option(64, "--batch", "-b", help="Batch for timing."),
    reps: int = typer.Option(3, "--reps"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """The cheapest EViT setting that meets a target, and the convert command for it.

    --target-gmacs/--target-speedup: the largest keep rate (and layer set). --max-drop/--min-agreement with --dataset: layer set and per-layer keep rates, by a greedy search on counted GMACs within the accuracy constraint.
    """
    from . import adapters
    from .bench import resolve_device
    from .explore import candidate_layer_sets, search as run, search_fidelity
    from .report import kv_table

    if batch < 1:
        raise EvitError(f"--batch must be at least 1, got {batch}")
    resolve_device(device)
    m = _load_converted(model, 1.0, layers, pretrained=pretrained, checkpoint=checkpoint)
    data = _data(dataset, split, None, None) if dataset else None
    if max_drop is not None or min_agreement is not None:
        from .accuracy_search import search_by_accuracy

        if data is None:
            raise EvitError("--max-drop/--min-agreement need --dataset: the images to measure on")
        if target_gmacs is not None or target_speedup is not None:
            raise EvitError("give an accuracy constraint or a GMACs/speedup target, not both")
        result = search_by_accuracy(m, data, max_drop=max_drop, min_agreement=min_agreement, limit=limit,
                                    search_layers=search_layers, batch=batch, device=device, workers=workers)
    else:
        sets = candidate_layer_sets(adapters.get_adapter(m).depth(m)) if search_layers else None
        result = run(m, target_gmacs=target_gmacs, target_speedup=target_speedup, layer_sets=sets, batch=batch, reps=reps, device=device)
        if data is not None:
            result["fidelity"] = search_fidelity(m, data, limit=limit, batch=batch, workers=workers, device=device)
    src = getattr(m, "evit_source", {}) or {}
    rates = result.get("keep_rates") or [result["keep_rate"]]
    parts = ["evit convert", shlex.quote(model), "--keep-rate " + ",".join(f"{r:g}" for r in rates),
             "--layers " + ",".join(map(str, result["layers"]))]
    if not pretrained:
        parts.append("--no-pretrained")
    if checkpoint:
        parts.append(f"--checkpoint {shlex.quote(str(checkpoint))}")
    if not result["fuse"]:
        parts.append("--no-fuse")
    result["model"] = src.get("model", model)
    result["command"] = " ".join(parts)
    _emit(result, as_json, kv_table("evit search", result))
    if not as_json:
        out.print(f"\nReproduce with:\n  {result['command']}", highlight=False, soft_wrap=True)


@app.command(epilog="Example: evit visualize deit_t_evit photo1.jpg photo2.jpg -o tokens.png")
def visualize(
    model: str = typer.Argument(..., help="Exported folder, or a model `evit convert` takes (converted with -k/-l)."),
    images: list[Path] = typer.Argument(..., help="Image files (any size: resized with the model's transform)."),
    output: Path = typer.Option(Path("evit_tokens.png"), "--output", "-o", help="PNG to write."),
    keep_rate: Optional[str] = typer.Option(None, "--keep-rate", "-k", help=KEEP_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help=LAYERS_HELP),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Which patches each EViT layer kept and which it fused: one panel per layer, fused patches blanked.

    A panel blanks every patch that no longer has a token of its own after that layer.
    """
    from .explore import visualize as run
    from .report import kv_table

    m = _load_converted(model, keep_rate, layers, pretrained=pretrained, checkpoint=checkpoint)
    result = run(m, [str(p) for p in images], output)
    _emit(result, as_json, kv_table(f"wrote {output}", {k: v for k, v in result.items() if k != "images"}))


@app.command(name="export", epilog="Example: evit export deit_s_evit --format onnx")
def export_cmd(
    folder: Path = typer.Argument(..., help="A folder written by `evit convert` or `evit finetune`."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript (safetensors is what convert writes)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. [default: FOLDER/model.onnx or FOLDER/model.torchscript.pt]"),
    check_batches: str = typer.Option("1,8", "--check-batches", help="Batch sizes the written file is run at and compared with PyTorch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the file if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Export the EViT model to ONNX or TorchScript: fixed token counts, dynamic batch, checked after export."""
    from . import artifact
    from .export import FORMATS, export
    from .report import kv_table

    if fmt not in FORMATS:
        raise EvitError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    try:
        batches = tuple(int(b) for b in check_batches.split(","))
    except ValueError:
        raise EvitError(f"--check-batches must be comma-separated integers, got {check_batches!r}") from None
    model = artifact.load(folder)
    result = export(model, fmt, output or folder / FORMATS[fmt], check_batches=batches, overwrite=overwrite)
    _emit(result, as_json, kv_table(f"exported {fmt}", result))


@app.command(epilog="Example: evit info deit_s_evit")
def info(
    folder: Path = typer.Argument(..., help="A folder written by `evit convert` or `evit finetune`."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """What an exported folder holds: source, layers, keep rates, token counts, GMACs, metrics if trained."""
    from . import artifact
    from .report import kv_table

    meta = artifact.read_meta(folder)
    e = meta.get("evit") or {}
    result = {
        "folder": str(folder), "family": meta["family"], "source": meta["source"].get("model"),
        "weights": artifact.weights_of(meta), "training": artifact.training_summary(meta),
        "num_classes": meta["num_classes"], "img_size": meta["img_size"], "layers": e.get("layers"),
        "keep_rates": e.get("keep_rates"), "fuse": e.get("fuse"),
        "tokens": [meta["num_tokens"]] + meta.get("token_counts", []),
        "gmacs_dense": meta.get("gmacs_dense"), "gmacs": meta.get("gmacs"), "tool_version": meta["tool_version"],
    }
    for name in ("metrics.json", "bench.json"):
        path = Path(folder) / name
        if path.is_file():
            data = json.loads(path.read_text())
            if name == "metrics.json":
                result["metrics"] = {k: data[k] for k in ("agreement", "kl", "top1", "top5", "val_loss", "epoch", "split") if k in data}
            else:
                result["bench"] = {"speedup": data["speedup"], "batch": data["batch"], "device": data["device_name"]}
    _emit(result, as_json, kv_table(f"evit info {folder}", {k: v for k, v in result.items() if v is not None}))


def main() -> None:
    try:
        app()
    except EvitError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
