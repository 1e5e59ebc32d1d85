"""Atomic writes: a reader never sees a half-written file or folder.

Temp files and folders are made beside their target and renamed into place;
they are removed on any failure, an interrupt included. What lands gets the
permissions an ordinary ``open``/``mkdir`` would give (the umask), not the
0600/0700 of ``tempfile``. Output paths are checked before any work starts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import EvitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and a folder's contents made by tempfile) the default permissions."""
    path = Path(path)
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _disk_message(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return (f"could not write {path}: the disk is full (No space left on device); free some space or choose "
                "another place")
    return f"could not write {path}: {e.strerror or e}; choose another place"


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, otherwise removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise EvitError(_disk_message(path, e)) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise EvitError(_disk_message(path, e)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, then rename it into place."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike, what: str = "file", fix: str | None = None) -> dict:
    """A JSON object from ``path``; a corrupt, non-UTF-8, empty or non-object file is a one-line
    error naming it, ending with ``fix`` (default: write the ``what`` again)."""
    path = Path(path)
    fix = fix or f"write the {what} again"
    if path.is_dir():
        raise EvitError(f"{path} is a folder, not a JSON file: {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvitError(f"{path} is not valid JSON ({e.__class__.__name__}: {e}): {fix}") from None
    if not isinstance(data, dict):
        raise EvitError(f"{path} does not hold a JSON object (it holds a {type(data).__name__}): {fix}")
    return data


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def check_writable(folder: str | os.PathLike) -> None:
    """A folder we can create files in, or create: refused before any work when it cannot be."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise EvitError(f"cannot write into {folder}: {existing} is a file, not a folder; choose another place")
    try:
        fd, probe = tempfile.mkstemp(prefix=".evit-write-test.", dir=existing)
    except OSError as e:
        raise EvitError(f"cannot write into {folder}: {existing} is not writable ({e.strerror or e}); "
                        "choose another place") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """An output folder: absent (or replaceable with ``overwrite``), in a writable place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EvitError(f"output {path} exists and is not a folder: choose another -o")
    if path.exists() and not overwrite:
        raise EvitError(f"output {path} already exists: choose another -o, or pass --overwrite to replace it")
    check_writable(path.parent)
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """An output file: not a folder, absent unless ``overwrite``, in a writable place."""
    path = Path(path)
    if path.is_dir():
        raise EvitError(f"output {path} is a folder: give a file name, e.g. {path / 'out'}")
    if path.exists() and not overwrite:
        raise EvitError(f"{path} already exists: choose another -o, or pass --overwrite")
    check_writable(path.parent)
    return path


def check_report_dir(path: str | os.PathLike) -> Path:
    """A folder that reports go into (it may exist already and keep its other files)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EvitError(f"{path} is a file, not a folder: give a folder for the report")
    check_writable(path if path.is_dir() else path.parent)
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)
        for f in tmp.rglob("*"):
            apply_umask(f)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EvitError(_disk_message(path, e).replace("another place", "another -o")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
