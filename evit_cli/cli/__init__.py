"""The ``evit`` command: parse, call the library, render.

The app is assembled here from one module per command group (options shared through
:mod:`.options`), and :func:`main` is the one error boundary: usage errors, the library's
:class:`~evit_cli.errors.EvitError`, file-system errors, Ctrl-C and SIGTERM each end as an exit code
and at most one line on stderr; an unexpected error is one line too, with how to see its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

try:  # typer >= 0.25 carries its own copy of click
    from typer._click import exceptions as clickx
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as clickx

from .._version import __version__
from ..errors import user_message
from . import bench, convert, evaluate, export, finetune, search, visualize
from .render import out, say

ROOT_EXAMPLE = ("Example: evit convert deit_small_patch16_224 --no-pretrained --keep-rate 0.7 --layers 4,7,10 "
                "-o deit_s_evit")

app = typer.Typer(
    help="Make Vision Transformers faster with EViT token reorganization (Liang et al., ICLR 2022).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # text is text: [default: ...], 'evit-cli[onnx]' and user paths print as written
    add_completion=False,
)


def _version(value: bool):
    if value:
        out.print(f"evit {__version__}")
        raise typer.Exit()


Version = Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")]
Debug = Annotated[bool, typer.Option("--debug", help="On an unexpected error, show the Python traceback (also "
                                     "EVIT_DEBUG=1). Taken anywhere on the command line; main() reads it before "
                                     "parsing.")]


@app.callback(epilog=ROOT_EXAMPLE)
def _root(version: Version = False, debug: Debug = False):
    """Make Vision Transformers faster with EViT token reorganization.

    Every command takes --help (with an example) and --json. Bad input is one line on stderr, exit code 2.
    """


for function, name, example in (
    (convert.convert, None, convert.EXAMPLE),
    (bench.bench, "bench", bench.EXAMPLE),
    (finetune.finetune, None, finetune.EXAMPLE),
    (evaluate.evaluate, "eval", evaluate.EVAL_EXAMPLE),
    (evaluate.sweep, None, evaluate.SWEEP_EXAMPLE),
    (search.search, None, search.EXAMPLE),
    (visualize.visualize, None, visualize.EXAMPLE),
    (export.export, "export", export.EXPORT_EXAMPLE),
    (export.info, None, export.INFO_EXAMPLE),
):
    app.command(name=name, epilog=example)(function)


def _usage_line(e: clickx.UsageError) -> str:
    where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
    return f"error: {e.format_message()}{where}"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every `finally` removes its temp files


def _unexpected(e: Exception) -> str:
    """The one line for an error that is a bug of ours, with how to see its traceback."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return (f"error: unexpected {type(e).__name__}{': ' + first if first else ''}. This is a bug in evit: run "
            "again with --debug (or EVIT_DEBUG=1) for the traceback, and please report it")


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
        say(_usage_line(e))
        return 2
    except clickx.ClickException as e:
        say(f"error: {e.format_message()}")
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        say("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the error boundary: nothing reaches the user as a traceback
        if debug:
            raise
        message = user_message(e)
        say(f"error: {message}" if message is not None else _unexpected(e))
        return 2 if message is not None else 1
    if rv == 130:  # typer turns Ctrl-C into exit code 130
        say("interrupted")
    return rv if isinstance(rv, int) else 0


def main(argv: Optional[list[str]] = None) -> None:
    """The `evit` command: one error boundary around the whole app."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EVIT_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
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
