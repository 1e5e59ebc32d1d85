"""Shipping the package's own modeling code inside an exported folder (transformers' remote code).

An entry module (:mod:`.remote`, or :mod:`.remote_timm` for the TimmWrapper layout) and every
module of the package it imports, directly or not, are copied flat into the folder, their
relative imports rewritten to the flat names (``from ..reorg import x`` -> ``from .evit_reorg
import x``): transformers' dynamic-module loader follows only same-folder ``from .name import``
lines, and requires every other import to be installed. The copies are the package's source,
byte for byte apart from those lines, so the shipped algorithm is the one evit runs.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from .._version import __version__
from ..errors import EvitError
from .remote import PREFIX

PACKAGE = "evit_cli"
ROOT = Path(__file__).resolve().parents[1]
ENTRY_FILE = "modeling_evit.py"
_FROM = re.compile(r"from\s+\.+[\w.]*\s+import")


def module_path(module: str) -> Path:
    """The source file of one of the package's modules (``evit_cli.adapters.block``)."""
    rel = Path(*module.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.is_file() else (ROOT / rel).with_suffix(".py")


def is_module(module: str) -> bool:
    return module.split(".")[0] == PACKAGE and module_path(module).is_file()


def flat_name(module: str, entry: str) -> str:
    """The module's file name in the folder, without ``.py``: ``evit_adapters_block``."""
    if module == entry:
        return ENTRY_FILE[:-3]
    return "evit_" + "_".join(module.split(".")[1:])


def _target(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module a relative import in ``module`` reads from."""
    parts = module.split(".")
    if module_path(module).name != "__init__.py":
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def package_imports(module: str) -> list[tuple[ast.ImportFrom, str]]:
    """Every import of the package in ``module``, with the module it reads; anything the flat copy
    could not keep (``import evit_cli``, ``from . import submodule``) is refused."""
    found = []
    for node in ast.walk(ast.parse(module_path(module).read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise EvitError(f"{module} imports {PACKAGE} by name: the shipped code must import relatively")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if (node.module or "").split(".")[0] == PACKAGE:
                raise EvitError(f"{module} imports {node.module} by name: the shipped code must import relatively")
            continue
        target = _target(module, node)
        if not is_module(target) or any(is_module(f"{target}.{a.name}") for a in node.names):
            raise EvitError(f"{module} line {node.lineno}: only `from .module import names` can be shipped flat")
        found.append((node, target))
    return found


def closure(entry: str) -> list[str]:
    """``entry`` and every module of the package it imports, directly or not (in source order)."""
    seen, todo = [entry], [entry]
    while todo:
        for _, target in package_imports(todo.pop()):
            if target not in seen:
                seen.append(target)
                todo.append(target)
    return seen


def flat_source(module: str, entry: str) -> str:
    """``module``'s source with its imports of the package rewritten to the flat names."""
    lines = module_path(module).read_text().splitlines(keepends=True)
    for node, target in package_imports(module):
        i, col = node.lineno - 1, node.col_offset
        lines[i] = lines[i][:col] + _FROM.sub(f"from .{flat_name(target, entry)} import", lines[i][col:], count=1)
    rel = module_path(module).relative_to(ROOT.parent).as_posix()
    return (f"# {rel} of evit {__version__}, its imports made flat: the package's own code, shipped with the model.\n"
            + "".join(lines))


def write(folder: Path, entry: str) -> list[str]:
    """Copy ``entry``'s closure flat into ``folder``; returns the file names written."""
    names = [flat_name(m, entry) for m in closure(entry)]
    if len(set(names)) != len(names):
        raise EvitError(f"two modules of {entry}'s closure share a flat name: rename one")
    for module, name in zip(closure(entry), names, strict=True):
        (folder / f"{name}.py").write_text(flat_source(module, entry))
    return [f"{n}.py" for n in names]


def add_auto_map(config_file: Path, auto_class: str, model_class: str, evit: dict | None,
                 also: tuple[str, ...] = ()) -> None:
    """Point ``config.json`` at the shipped class (for ``auto_class`` and the Auto classes ``also``, e.g. the
    zero-shot one that transformers' pipeline loads) and record the EViT settings it applies."""
    config = json.loads(config_file.read_text())
    config["auto_map"] = {a: f"{ENTRY_FILE[:-3]}.{PREFIX}{model_class}" for a in (auto_class, *also)}
    config["evit"] = evit
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

