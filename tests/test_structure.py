"""The package's shape, read from its source: imports point one way (no circle, module-level or
inside functions), and no function is longer than a reader can see whole."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evit_cli"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its body)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files and a.name != name}
                continue
            else:
                continue
            base, *names = targets
            # ``from pkg import sub`` imports the submodule; ``from pkg import thing`` imports pkg
            modules = [t for t in names if t in files]
            imported = modules + [base] * (len(modules) < len(names))
            deps |= {t for t in imported if t in files and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and nested functions included) longer than ``limit`` lines, from its
    ``def`` line to its last line."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_long_functions_are_found(tmp_path):
    (tmp_path / "m.py").write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * 70)
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:5 long (71 lines)"]


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []


# The layers, bottom to top: a module imports from its own layer or those below it, never above.
LAYERS = ("utils", "algorithm", "adapters", "model", "io", "measure", "train", "cli")
BASE = {"evit_cli.errors", "evit_cli._version"}  # usable by every layer


def layer_of(module: str) -> int:
    if module in BASE:
        return -1
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return len(LAYERS)  # the package's front door: the public API
    return LAYERS.index(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def test_upward_imports_are_found():
    assert upward_imports({"evit_cli.model.x": {"evit_cli.io.y", "evit_cli.algorithm.z"}}) == [
        "evit_cli.model.x -> evit_cli.io.y"]


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_every_module_sits_in_a_layer_folder():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert set(folders) <= set(LAYERS), folders


def test_no_module_is_longer_than_an_hour_allows():
    long = [f"{p.relative_to(PACKAGE.parent)} ({n} lines)" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450]
    assert long == []


def test_the_model_state_is_read_through_its_accessor_only():
    state = PACKAGE / "algorithm" / "state.py"
    readers = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
               if p != state and ('getattr(model, "evit_' in p.read_text() or "model.evit_" in p.read_text())]
    assert readers == []
