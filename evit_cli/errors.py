"""The one exception the tool raises for bad input, and which environment errors are the user's."""

from __future__ import annotations

import errno
import re


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
        return f"permission denied:{where}; fix its permissions, or choose another path"
    if isinstance(e, NotADirectoryError):
        return f"{where.strip()} is below a regular file, not a folder: choose another path"
    if isinstance(e, IsADirectoryError):
        return f"{where.strip()} is a folder where a file was expected: give a file"
    if isinstance(e, FileExistsError):
        return f"{where.strip()} already exists: choose another path, or pass --overwrite"
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename} does not exist: check the path"
    return None


_MEMORY_TEXT = ("can't allocate memory", "not enough memory", "out of memory")
_ALLOCATION = re.compile(r"(?:tried to allocate|Tried to allocate)\s+([\d.]+)\s*(bytes|[KMGTP]i?B)")
_UNITS = {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50}
MEMORY_HINT = "lower --batch (or --batch-size), --img-size or --check-batches, or use a smaller model"


def size_text(n: float) -> str:
    """A byte count for people: 1.5 GB, 120 GB, 12.3 TB."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _MEMORY_TEXT)


def memory_message(e: BaseException, hint: str = MEMORY_HINT) -> str:
    """Out of memory, with the allocation that did not fit when the allocator says it, then ``hint``."""
    found = _ALLOCATION.search(str(e))
    where = "GPU memory" if "CUDA" in str(e) else "memory"
    if found:
        size = size_text(float(found.group(1)) * _UNITS.get(found.group(2), 1))
        return f"out of {where}: {size} did not fit in one allocation; {hint}"
    return f"out of {where}; {hint}"


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
    if is_out_of_memory(e):
        return memory_message(e)
    if isinstance(e, UnicodeDecodeError):
        return f"a file given is not UTF-8 text ({e}): save it as UTF-8"
    if type(e).__name__ == "DecompressionBombError":
        return f"refused an image larger than PIL's safety limit ({e}): resize it, or leave it out"
    if isinstance(e, OSError):
        return _os_message(e)
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (at most 200 characters), for one-line messages."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
