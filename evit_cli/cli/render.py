"""Where the commands write: stdout (tables, or JSON with --json) and stderr (progress, one-line
errors). Text is text: nothing a user wrote is read as rich markup."""

from __future__ import annotations

import json
import sys

from rich.console import Console

out = Console(markup=False, highlight=False, emoji=False)
err = Console(stderr=True, markup=False, highlight=False, emoji=False)


def emit(result: dict, as_json: bool, *renderables) -> None:
    """``result`` as JSON on stdout with ``as_json``, else the renderables (tables, lines)."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        for r in renderables:
            out.print(r)


def say(text: str) -> None:
    """One line on stderr, whatever the message holds."""
    sys.stderr.write(" ".join(line.strip() for line in str(text).splitlines() if line.strip()) + "\n")
    sys.stderr.flush()


def without(result: dict, *keys: str) -> dict:
    """``result`` less ``keys``: what a table shows of it."""
    return {k: v for k, v in result.items() if k not in keys}
