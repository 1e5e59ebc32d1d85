"""The settings of a fine-tune, each declared once: a field of :class:`TrainConfig`.

A field's metadata is everything the tool says or checks about it (see :func:`option`): its help
text, the check its value goes through, its group in ``evit finetune --help``, its flags, and
the default as ``--help`` shows it. ``evit finetune``'s options are made from these fields
(:func:`evit_cli.cli.options.config_parameters`), a recipe's keys are their names, and a value is
checked in ``TrainConfig.__post_init__`` wherever it comes from: a flag, a recipe or a library call.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..algorithm.config import METHODS, parse_keep_rates, parse_layers
from ..errors import EvitError
from ..model import validate
from ..model.validate import optional

DEFAULT_LR = 5e-5  # recipes/recover.yaml: AdamW at batch 32 on a pretrained model

MODEL, DATA, AUGMENT, OPTIMISE, SCHEDULE, DISTIL, RUN = (
    "Model", "Data", "Augmentation", "Optimisation", "Keep-rate schedule", "Distillation", "The run")


def option(default=None, help: str = "", *, check=None, group: str = MODEL, flags: tuple[str, ...] = (),
           shown: str | None = None, kind=None, cli: bool = True, argument: bool = False, factory=None):
    """A :class:`TrainConfig` field and all that is said about it.

    ``check(label, value)`` returns the value (converted) or raises EvitError; ``flags`` are the
    command line's names (default ``--field-name``, ``--name/--no-name`` for a yes-or-no);
    ``shown`` is the default as ``--help`` says it (default: the value itself); ``kind`` the type
    the command line parses (default: the field's); ``cli=False`` keeps it off the command line.
    """
    metadata = {"help": help, "check": check, "group": group, "flags": flags, "shown": shown, "kind": kind,
                "cli": cli, "argument": argument}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _text_kept(parse):
    """A check for a comma-separated value that is parsed later, against the model: refuse bad
    text (or numbers) now, keep the value as it was given."""

    def check(label: str, value):
        parse(value, label)
        return value

    return check


KEEP_RATES, LAYERS = optional(_text_kept(parse_keep_rates)), optional(_text_kept(parse_layers))
BOOL, MAYBE_BOOL, MAYBE_TEXT = validate.boolean, optional(validate.boolean), optional(validate.text)
HEAD_HELP = ("auto: keep the model's head when the data set's classes map onto its classes (ImageNet synset folders "
             "onto a 1000-class model, names in id2label) or there are no labels, else a new one; a headless model "
             "stays headless (its embedding is distilled, labels score kNN top-1); keep; new.")
DISTILL_LOSS_HELP = ("auto: MSE on all the logits of a classifier, 1 - cosine + relative MSE on an embedding model's "
                     "embedding; mse; kl (at --distill-tau: the old recovery); cosine.")
FEATURES_HELP = ("A classifier's feature term: this weight x the MSE between the student's and the dense teacher's "
                 "pre-logits features (the input of the head), added to the logit term; 0: off.")
LAYERS_TERM_HELP = ("The layer term: this weight x the MSE between the student's and the dense teacher's class "
                    "(prefix) tokens after every layer but the last, relative to the teacher's mean square, averaged "
                    "over layers; 0: off.")
ORACLE_HELP = ("While training, keep the tokens the teacher's class attention ranks highest (the paper's oracle; the "
               "teacher: --teacher, or the dense model before conversion). At inference the model chooses by its own "
               "attention.")


@dataclass
class TrainConfig:
    """Everything a run needs; recipes (YAML) and flags fill it. Epoch counts may be fractional.

    The defaults are the recovery recipe (recipes/recover.yaml): function matching with the dense
    model (teacher and student see the same random-resized, flipped, mixup/CutMix-mixed images; MSE
    on the logits, or cosine on an embedding), AdamW lr 5e-5, weight decay 0.05, batch 32, cosine, 2 epochs
    (an embedding model: 4).
    """

    model: str = option("", "Anything `evit convert` takes, or an exported folder. [default: the recipe's]",
                        argument=True)
    dataset: str = option("", "Hub name, image folder (class per subfolder), save_to_disk folder, or parquet.",
                          group=DATA, flags=("--dataset", "-d"), shown="the recipe's")
    output: str = option("", "Output folder: checkpoints while training, the exported model at the end.",
                         group=RUN, flags=("--output", "-o"), shown="the recipe's")
    keep_rate: object = option(None, "Keep rate: one for every layer (0.7) or one per layer (0.9,0.8,0.7).",
                               check=KEEP_RATES, flags=("--keep-rate", "-k"), shown="0.7, or the model's own", kind=str)
    layers: object = option(None, "1-based block numbers to reorganize in, as in the paper.", check=LAYERS,
                            flags=("--layers", "-l"), shown="4,7,10, or the model's own", kind=str)
    fuse: bool | None = option(None, "Fuse or drop the inattentive tokens.", check=MAYBE_BOOL,
                               shown="the model's own, else fuse")
    method: str | None = option(None, "How the inattentive tokens are reorganized: evit (the paper's) or squeeze "
                                "(docs/algorithm.md); the model trains from that starting point.",
                                check=optional(validate.one_of(*METHODS)), shown="the model's own, else evit")
    pretrained: bool = option(True, "Start from pretrained weights.", check=BOOL)
    checkpoint: str | None = option(None, "Local weights for MODEL.", check=MAYBE_TEXT, flags=("--checkpoint", "-c"),
                                    shown="none")
    num_classes: int | None = option(None, "Classifier size; 0: headless, the embedding (timm models; a checkpoint's "
                                     "head is dropped). Not for an exported folder.",
                                     check=optional(validate.non_negative_int), shown="the model's or the checkpoint's")
    head: str = option("auto", HEAD_HELP, check=validate.one_of("auto", "keep", "new"))
    img_size: int | None = option(None, "Train and export at this resolution (position embeddings interpolated).",
                                  check=optional(validate.positive_int), shown="the model's")
    # data
    train_split: str = option("train", "The split to train on.", check=validate.text, group=DATA)
    val_split: str | None = option(None, "The split to validate on.", check=MAYBE_TEXT, group=DATA,
                                   shown="validation/val/test if present, else carved from train")
    val_fraction: float = option(0.1, "Share of train held out (seeded) when there is no validation split.",
                                 check=validate.open_fraction, group=DATA)
    image_column: str | None = option(None, "The column of the images.", check=MAYBE_TEXT, group=DATA,
                                      shown="found automatically")
    label_column: str | None = option(None, "The column of the labels.", check=MAYBE_TEXT, group=DATA,
                                      shown="found automatically")
    streaming: bool = option(False, "Stream the data set instead of memory-mapping it.", check=BOOL, group=DATA)
    steps_per_epoch: int | None = option(None, "Optimizer steps per epoch (needed with --streaming).",
                                         check=optional(validate.positive_int), group=DATA,
                                         shown="the training split's images / the global batch")
    workers: int = option(2, "DataLoader workers per process.", check=validate.non_negative_int, group=DATA)
    randaugment: str | None = option(None, "timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1.",
                                     check=optional(validate.randaugment), group=AUGMENT,
                                     shown="off: random-resized crop and flip only")
    color_jitter: float = option(0.0, "Colour jitter strength.", check=validate.non_negative, group=AUGMENT)
    mixup: float = option(1.0, "Mixup alpha (0 = off); the teacher sees the same mixed images.",
                          check=validate.non_negative, group=AUGMENT)
    cutmix: float = option(1.0, "CutMix alpha (0 = off); with mixup on, one of the two per batch.",
                           check=validate.non_negative, group=AUGMENT)
    smoothing: float = option(0.1, "Label smoothing of the label term (none without labels).",
                              check=validate.below_one, group=AUGMENT)
    # optimisation
    epochs: float | None = option(None, "Epochs to train (fractions allowed).", check=optional(validate.positive),
                                  group=OPTIMISE, shown="2, and 4 for an embedding model (no classification head)")
    batch_size: int = option(32, "Per process.", check=validate.positive_int, group=OPTIMISE,
                             flags=("--batch-size", "-b"))
    lr: float | None = option(None, "Peak learning rate.", check=optional(validate.positive), group=OPTIMISE,
                              shown="5e-5, or --lr-per-512 x global batch / 512")
    lr_per_512: float | None = option(None, "Learning rate per 512 images of global batch (the paper's recipes: 2e-5).",
                                      check=optional(validate.positive), group=OPTIMISE, shown="none: --lr")
    min_lr: float = option(1e-6, "End of the cosine; clamped to the peak.", check=validate.non_negative,
                           group=OPTIMISE)
    weight_decay: float = option(0.05, "AdamW weight decay.", check=validate.non_negative, group=OPTIMISE)
    warmup_epochs: float = option(0.0, "Learning-rate warm-up.", check=validate.non_negative, group=OPTIMISE)
    clip_grad: float | None = option(None, "Gradient norm clipping.", check=optional(validate.positive),
                                     group=OPTIMISE, shown="off")
    accum_steps: int = option(1, "Gradient accumulation.", check=validate.positive_int, group=OPTIMISE)
    amp: bool = option(False, "Mixed precision (bf16 where supported, else fp16).", check=BOOL, group=OPTIMISE)
    seed: int = option(0, "Seed of the data order, the augmentation and the new weights.",
                       check=validate.non_negative_int, group=OPTIMISE)
    device: str | None = option(None, "cpu, cuda or cuda:N.", check=optional(validate.device), group=OPTIMISE,
                                shown="cuda when available, else cpu")
    # keep-rate schedule
    shrink_start: float = option(0.0, "Epochs at keep rate 1.0 first.", check=validate.non_negative, group=SCHEDULE)
    shrink_epochs: float = option(0.0, "Epochs of cosine from 1.0 to the target.", check=validate.non_negative,
                                  group=SCHEDULE)
    # distillation: None distils whenever the teacher's classes fit (always without labels)
    distill: bool | None = option(None, "Distil from the dense model before conversion (its output: logits, or an "
                                  "embedding).", check=MAYBE_BOOL, group=DISTIL,
                                  shown="whenever its classes fit; always without labels")
    teacher: str | None = option(None, "Another teacher model (implies --distill).", check=MAYBE_TEXT, group=DISTIL,
                                 shown="the dense model before conversion")
    distill_loss: str = option("auto", DISTILL_LOSS_HELP, check=validate.one_of(*validate.DISTILL_LOSSES),
                               group=DISTIL)
    distill_alpha: float = option(0.5, "Weight of the distillation term against the label term (without labels it "
                                  "is the whole loss).", check=validate.unit_interval, group=DISTIL)
    distill_tau: float = option(1.0, "Temperature of --distill-loss kl.", check=validate.positive, group=DISTIL)
    distill_features: float = option(1.0, FEATURES_HELP, check=validate.non_negative, group=DISTIL)
    distill_layers: float | None = option(None, LAYERS_TERM_HELP, check=optional(validate.non_negative),
                                          group=DISTIL, shown="1 for an embedding model, 0 for a classifier")
    oracle: bool = option(False, ORACLE_HELP, check=MAYBE_BOOL, group=DISTIL)
    # bookkeeping
    save_every: int = option(0, "Also checkpoint every N optimizer steps.", check=validate.non_negative_int,
                             group=RUN, shown="0: at the end of each epoch only")
    checkpoint_dir: str | None = option(None, "Where the training checkpoint goes.", check=MAYBE_TEXT, group=RUN,
                                        shown="OUTPUT.train, beside the export")
    resume: bool = option(False, "Continue the run in --output after a crash or a kill.", check=BOOL, group=RUN,
                          flags=("--resume",))
    overwrite: bool = option(False, "Replace an existing output folder.", check=BOOL, group=RUN, flags=("--overwrite",))
    bench: bool = option(True, "Benchmark the trained model at the end (`evit finetune` does; the library's "
                         "finetune leaves it to the caller).", check=BOOL, group=RUN)
    bench_batch: int = option(32, "Batch size of that benchmark.", check=validate.positive_int, group=RUN)
    extra: dict = option(help="Free-form notes kept with the run's settings.", cli=False, factory=dict)

    def __post_init__(self):
        self.check()

    def check(self) -> TrainConfig:
        """Every value through its field's check (recipe, flag or library call alike); run on
        creation, and again when a run starts. (A ``min_lr`` above the peak is clamped to it, and
        said in the run's notes; the command refuses it when both were given.)"""
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None:
                setattr(self, f.name, check(flag_of(f.name), getattr(self, f.name)))
        return self

    @classmethod
    def merged(cls, recipe: dict | None, flags: dict) -> TrainConfig:
        """Recipe values, overridden by every flag that was given (not None)."""
        recipe = {k.replace("-", "_"): v for k, v in (recipe or {}).items()}
        unknown = sorted(set(recipe) - set(recipe_keys()))
        if unknown:
            raise EvitError(f"unknown recipe keys {unknown}: see `evit finetune --help` for the names")
        values = {**recipe, **{k: v for k, v in flags.items() if v is not None}}
        return cls(**values)


def flag_of(name: str) -> str:
    """The command line's name of a field (what messages call it)."""
    return "MODEL" if name == "model" else "--" + name.replace("_", "-")


def recipe_keys() -> list[str]:
    """The keys a recipe may set: the names of the fields."""
    return [f.name for f in fields(TrainConfig)]


def field_check(name: str):
    """The check of field ``name`` (what a flag's value and a recipe's value both go through)."""
    return next(f for f in fields(TrainConfig) if f.name == name).metadata["check"]


def default_text(f) -> str | None:
    """A field's default as ``--help`` says it: ``shown``, else the value (a yes-or-no by its flag)."""
    if f.metadata.get("shown") is not None:
        return f.metadata["shown"]
    if f.default is MISSING or f.default is None:
        return None
    if isinstance(f.default, bool):
        return ("" if f.default else "no-") + f.name.replace("_", "-")
    if isinstance(f.default, float):
        return format(f.default, "g").replace("e-0", "e-")
    return str(f.default)


def load_recipe(path: str | os.PathLike) -> dict:
    """A recipe's settings: a YAML mapping of field names to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EvitError(f"recipe {path} does not exist: see the recipes/ folder")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EvitError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvitError(f"recipe {path} must be a mapping of option names to values")
    return data
