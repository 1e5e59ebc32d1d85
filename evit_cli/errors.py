"""The one exception the tool raises for bad input, and which environment errors are the user's."""

from __future__ import annotations

import errno


class EvitError(Exception):
    """Bad input or an environment problem. The message says what was wrong and what to do."""


def _where(e: OSError) -> str:
    return f" {e.filename}" if e.filename else ""


def _os_message(e: OSError) -> str | None:
    where = _where(e)
    if e.errno == errno.ENOSPC:
        return f"the disk is full (No space left on device) writing{where}: free some space or choose another place"
    if e.errno == errno.EROFS:
        return f"read-only file system:{where} cannot be written; choose another place"
    if isinstance(e, PermissionError):
        return f"permission denied:{where}; choose a place you can write to, or fix its permissions"
    if isinstance(e, NotADirectoryError):
        return f"{where.strip()} is below a regular file, not a folder: choose another path"
    if isinstance(e, IsADirectoryError):
        return f"{where.strip()} is a folder where a file was expected: give a file"
    if isinstance(e, FileExistsError):
        return f"{where.strip()} already exists: choose another path, or pass --overwrite"
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename} does not exist: check the path"
    return None


def _unwrapped(text: str) -> str:
    """The message itself, when a DataLoader worker re-raised it with the worker's traceback around it."""
    marker = "EvitError: "
    if text.startswith("Caught EvitError in DataLoader worker") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def user_message(e: BaseException) -> str | None:
    """The one-line message for an error that is the user's to fix, or None when it is a bug of ours."""
    if isinstance(e, EvitError):
        return _unwrapped(str(e))
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return "out of memory: lower --batch (or --batch-size), or use a smaller model or --img-size"
    if type(e).__name__ == "DecompressionBombError":
        return f"refused an image larger than PIL's safety limit ({e}): resize it, or leave it out"
    if isinstance(e, OSError):
        return _os_message(e)
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), for one-line messages."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
