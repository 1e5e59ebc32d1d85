"""The command reference (docs/reference.md), written from the command line itself.

Every command's help text, usage, example and a table of its arguments and options are read from the
Typer app, so the page says what ``evit --help`` says and cannot go stale (a test compares the file
with :func:`markdown`). Regenerate it with::

    python -m evit_cli.cli.reference > docs/reference.md
"""

from __future__ import annotations

import re

import typer

from evit_cli.cli import app

TITLE = "# Command reference"
INTRO = ("Generated from the command line itself by `python -m evit_cli.cli.reference > docs/reference.md`: "
         "do not edit by hand. `evit COMMAND --help` prints the same text. Conventions shared by every command "
         "(`--json`, errors and exit codes, progress) are on the [home page](index.md).")
HEADER = "| name | type | default | help |\n|---|---|---|---|"


def _text(text: str, cell: bool = True) -> str:
    """``text`` on one line, read as text by Markdown (GitHub and MkDocs alike; `code` stays code); ``cell``:
    also safe in a table cell."""
    text = " ".join(str(text).split())
    text = re.sub(r"([\\*])", r"\\\1", text).replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "&#124;") if cell else text


def _prose(text: str) -> str:
    """Help text as Markdown paragraphs: lines joined, blank lines kept, click's ``\\b`` markers gone."""
    paragraphs = re.split(r"\n\s*\n", (text or "").replace("\b", "").strip())
    return "\n\n".join(_text(p, cell=False) for p in paragraphs if p.strip())


def _flag(param) -> bool:
    return bool(getattr(param, "is_flag", False))


def _type(param, ctx) -> str:
    """The type as ``--help`` shows it: ``flag``, or the value's type (typer's ``<int>``, click's ``integer``)."""
    if _flag(param):
        return "flag"
    if hasattr(param, "display_type"):  # typer >= 0.25: its own parameter classes
        return param.display_type(ctx).strip("<>")
    return getattr(param.type, "name", str(param.type))


def _default(param, ctx) -> str:
    """The default as ``--help`` would show it; empty where there is none (the help then says it)."""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    value = param.get_default(ctx, call=False)
    if callable(value):
        return "(dynamic)"
    if value is None:
        return ""
    if _flag(param) and param.secondary_opts:
        return (param.opts if value else param.secondary_opts)[0].lstrip("-")
    if _flag(param):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _names(param) -> str:
    """``--fuse`` / ``--no-fuse``, ``--keep-rate``, ``-k``; an argument by its metavar in capitals."""
    if param.param_type_name == "argument":
        return f"`{(param.metavar or param.name).upper()}`"
    return ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])


def _row(param, ctx) -> str:
    required = " (required)" if param.required and param.param_type_name == "option" else ""
    cells = [_names(param), _text(_type(param, ctx)), _text(_default(param, ctx)),
             _text((getattr(param, "help", None) or "") + required)]
    return "| " + " | ".join(cells) + " |"


def _table(params, ctx) -> list[str]:
    rows = [_row(p, ctx) for p in params if not getattr(p, "hidden", False)]
    return [HEADER, *rows] if rows else []


def _usage(command, ctx) -> str:
    """The usage line as ``--help`` prints it."""
    return re.sub(r"^Usage:\s*", "", command.get_usage(ctx).strip())


def _example(epilog: str | None) -> list[str]:
    """The example of the epilog as a ``text`` block (not ``bash``: the docs test runs only those)."""
    text = (epilog or "").strip()
    if not text:
        return []
    command = re.sub(r"^Example:\s*", "", text)
    return ["Example:", "", "```text", command, "```", ""]


def _section(name: str, command, parent) -> list[str]:
    """One command: heading, help text, usage, example, arguments and options."""
    ctx = command.context_class(command, info_name=name, parent=parent)
    lines = [f"## evit {name}", "", _prose(command.help), "", "```text", _usage(command, ctx), "```", ""]
    lines += _example(command.epilog)
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name != "argument"]
    if arguments:
        lines += ["Arguments:", "", *_table(arguments, ctx), ""]
    lines += ["Options (and `--help`, `--debug`):", "", *_table(options, ctx), ""]
    return lines


def _root(group, ctx) -> list[str]:
    """The ``evit`` command itself: its help, its global options and the list of commands."""
    lines = [TITLE, "", INTRO, "", _prose(group.help), "", "```text", _usage(group, ctx),
             "```", ""]
    lines += _example(group.epilog)
    lines += ["Global options:", "", *_table(group.params, ctx), "", "Commands:", ""]
    for name, command in group.commands.items():
        summary = command.get_short_help_str(limit=200) if hasattr(command, "get_short_help_str") else command.help
        lines.append(f"- [`evit {name}`](#evit-{name}): {_text(summary, cell=False)}")
    return [*lines, ""]


def markdown() -> str:
    """The whole reference page: the ``evit`` group, then every command in the order ``--help`` lists them."""
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="evit")
    lines = _root(group, ctx)
    for name, command in group.commands.items():
        lines += _section(name, command, ctx)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
