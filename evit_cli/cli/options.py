"""Every option and argument the commands share, declared once as an ``Annotated`` alias, and the
callbacks that check a value when it is parsed (naming the option in the one-line error).

An option whose help differs between commands (a batch size for timing or for evaluation) is a
small function of that help; the flag names and the check are still written here only.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..algorithm.config import METHODS, SCORES, parse_keep_rates, parse_layers
from ..algorithm.restore import DEFAULT_STRATEGY, DEFAULT_TEMPERATURE, RESTORE_EXAMPLE, STRATEGIES, parse_restore
from ..model import validate
from ..train.config import default_text, field_check

KEEP_HELP = "Keep rate: one for every layer (0.7) or one per layer (0.9,0.8,0.7)."
LAYERS_HELP = "1-based block numbers to reorganize in, as in the paper."
SKIP_HELP = "Skip images that cannot be decoded (and report how many) instead of stopping at the first."
FOLDER_OWN = " [default: {}, or an exported folder's own]"
MODEL_OWN = " [default: {}, or the model's own]"
EVAL_SPLIT_HELP = "[default: validation/val/test if present, else all of train]"


def checked(check):
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


POSITIVE_INT = checked(validate.positive_int)
NON_NEGATIVE_INT = checked(validate.non_negative_int)
POSITIVE = checked(validate.positive)
NON_NEGATIVE = checked(validate.non_negative)
PERCENT = checked(validate.percent)
DEVICE = checked(validate.device)
KEEP_RATES = checked(_keeps_text(parse_keep_rates))
LAYERS = checked(_keeps_text(parse_layers))
RESTORE = checked(_keeps_text(parse_restore))
BATCHES = checked(_keeps_text(lambda value, label: validate.int_list(label, value)))


def train_check(name: str):
    """The callback of a finetune option: the same check a recipe value of that name gets."""
    return checked(field_check(name))


def _parsed_type(f: dataclasses.Field, hints: dict):
    """What the command line parses a field's value as: ``kind``, else its type without None."""
    if f.metadata.get("kind") is not None:
        return f.metadata["kind"]
    args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
    return args[0] if args else hints[f.name]


def field_parameter(f: dataclasses.Field, hints: dict) -> inspect.Parameter:
    """The command-line parameter of a settings field (see :func:`evit_cli.train.config.option`).
    Its value is None when not given, so that a recipe's value or the field's default applies;
    its help ends with that default, ``[default: ...]``."""
    meta, kind = f.metadata, _parsed_type(f, hints)
    if meta.get("argument"):
        info = typer.Argument(help=meta["help"], show_default=False)
    else:
        flags = meta.get("flags") or ("--{0}/--no-{0}" if kind is bool else "--{0}").format(f.name.replace("_", "-"))
        flags = (flags,) if isinstance(flags, str) else flags
        shown = None if kind is bool and not any("/" in x for x in flags) else default_text(f)  # a bare flag: off
        info = typer.Option(*flags, help=meta["help"] + (f" [default: {shown}]" if shown else ""), show_default=False,
                            callback=checked(meta["check"]) if meta.get("check") else None,
                            rich_help_panel=meta.get("group"))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


def config_parameters(cls) -> list[inspect.Parameter]:
    """The command-line parameters of every field of the settings dataclass ``cls`` that has one,
    in the order of the fields."""
    hints = typing.get_type_hints(cls)
    return [field_parameter(f, hints) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def with_parameters(function, parameters: list[inspect.Parameter]):
    """``function(**values)`` as a command with ``parameters`` (what typer reads to build its options)."""
    function.__signature__ = inspect.Signature(parameters)
    function.__annotations__ = {p.name: p.annotation for p in parameters}
    return function


# --- the model -------------------------------------------------------------------------------------

def model_argument(help: str):
    return Annotated[str, typer.Argument(help=help)]


FolderArgument = Annotated[Path, typer.Argument(help="A folder written by `evit convert` or `evit finetune`.")]


def keep_rate(default: str = FOLDER_OWN):
    return Annotated[Optional[str], typer.Option("--keep-rate", "-k", callback=KEEP_RATES,
                                                 help=KEEP_HELP + default.format("0.7"))]


def layers(default: str = FOLDER_OWN):
    return Annotated[Optional[str], typer.Option("--layers", "-l", callback=LAYERS,
                                                 help=LAYERS_HELP + default.format("4,7,10"))]


KeepRate = keep_rate()
Layers = layers()


def fuse(help: str):
    return Annotated[Optional[bool], typer.Option("--fuse/--no-fuse", help=help, show_default=False)]


Method = Annotated[Optional[str], typer.Option(
    "--method", callback=checked(validate.one_of(*METHODS)), show_default=False,
    help="How the inattentive tokens are reorganized: evit (the paper's: fused into one token) or squeeze (each into "
         "its most similar kept token, ranked by class attention x value norm, with proportional attention; "
         "docs/algorithm.md). [default: evit, or an exported folder's own]")]


Score = Annotated[Optional[str], typer.Option(
    "--score", callback=checked(validate.one_of(*SCORES)), show_default=False,
    help="What ranks the tokens: cls (the class token's attention, the paper's), mean_query (the attention row of "
         "the mean query), received (the attention each token receives from all queries) or probe (an attention-pool "
         "head's own query; timm MAP towers, SigLIP); the last three need no class token and fuse into the "
         "score-weighted mean (docs/algorithm.md). [default: cls where the model has a class token, else received; "
         "or an exported folder's own]")]


Restore = Annotated[Optional[str], typer.Option(
    "--restore", callback=RESTORE, show_default=False, metavar="STRATEGY[:TEMPERATURE[:TOP_K]]",
    help=f"Dense prediction: how the removed patches are put back on the full grid (timm's forward_intermediates NCHW "
         f"maps, transformers backbones, depth and segmentation models): {', '.join(STRATEGIES)}, optionally with the "
         f"softmax temperature over cosine similarities and the top-k most similar kept tokens, e.g. {RESTORE_EXAMPLE} "
         f"(docs/dense.md). Kept in the folder; refused for a transformers classifier, which never puts them back. "
         f"[default: {DEFAULT_STRATEGY}:{DEFAULT_TEMPERATURE:g}, or an exported folder's own]")]


def pretrained(help: str = "For a model name (not for an exported folder). [default: pretrained]"):
    return Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help=help, show_default=False)]


def checkpoint(help: str = "Local weights for MODEL (not for an exported folder).", kind=Path):
    return Annotated[Optional[kind], typer.Option("--checkpoint", "-c", help=help)]


Pretrained = pretrained()
Checkpoint = checkpoint()
ImgSize = Annotated[Optional[int], typer.Option(
    "--img-size", callback=POSITIVE_INT,
    help="Run at this resolution, a multiple of the patch size (position embeddings interpolated).")]

# --- data ------------------------------------------------------------------------------------------


def dataset(help: str, required: bool = False):
    kind = str if required else Optional[str]
    return Annotated[kind, typer.Option("--dataset", "-d", help=help)]


Split = Annotated[Optional[str], typer.Option("--split", help=EVAL_SPLIT_HELP)]
ImageColumn = Annotated[Optional[str], typer.Option("--image-column", help="[default: found automatically]")]
LabelColumn = Annotated[Optional[str], typer.Option("--label-column", help="[default: found automatically]")]
Limit = Annotated[Optional[int], typer.Option("--limit", callback=POSITIVE_INT,
                                              help="Evaluate on a seeded sample of N images. [default: all]")]
Workers = Annotated[int, typer.Option("--workers", callback=NON_NEGATIVE_INT, help="DataLoader workers.")]
SkipBadImages = Annotated[bool, typer.Option("--skip-bad-images", help=SKIP_HELP)]

# --- running and timing ----------------------------------------------------------------------------


def batch(help: str):
    return Annotated[int, typer.Option("--batch", "-b", callback=POSITIVE_INT, help=help)]


def reps(help: str):
    return Annotated[int, typer.Option("--reps", callback=POSITIVE_INT, help=help)]


Device = Annotated[str, typer.Option("--device", callback=DEVICE, help="cpu, cuda or cuda:N.")]

# --- what is written -------------------------------------------------------------------------------


def output(help: str, kind=Optional[Path]):
    return Annotated[kind, typer.Option("--output", "-o", help=help)]


def overwrite(help: str):
    return Annotated[bool, typer.Option("--overwrite", help=help)]


def report(help: str):
    return Annotated[Optional[Path], typer.Option("--report", help=help)]


def as_json(help: str = "Print the result as JSON on stdout."):
    return Annotated[bool, typer.Option("--json", help=help)]


AsJson = as_json()
