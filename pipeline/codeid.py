"""Code identity, derived from the code: which project modules a file imports (directly or through others, imports
inside functions included) and a hash of their code. A stage's cache key covers exactly what its code can reach,
so no hand-kept module list can drift. Nothing is imported: files are read and parsed."""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent


def module_file(name: str) -> Path | None:
    """The source file of project module `name` (pipeline.a.b), or None when `name` is not one (e.g. a class)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    path = ROOT.joinpath(*name.split(".")[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def imported_modules(path: Path) -> tuple[str, ...]:
    """Project modules the file at `path` names in any import statement."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return tuple(sorted({n for n in names if module_file(n) is not None}))


def reachable_files(path: Path) -> list[Path]:
    """`path` and the files of every project module it reaches through imports."""
    seen: dict[Path, None] = {path.resolve(): None}
    todo = [path.resolve()]
    while todo:
        for name in imported_modules(todo.pop()):
            found = module_file(name)
            if found not in seen:
                seen[found] = None
                todo.append(found)
    return sorted(seen)


@functools.cache
def source_hash(path: Path) -> str:
    """Hash of a module's code with docstrings and comments dropped, so edits to behaviour invalidate the cache."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
            getattr(body[0], "value", None), ast.Constant
        ) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def code_hash(path: Path) -> str:
    """One hash over the code of `path` and of every project module it reaches."""
    return hashlib.sha256("".join(source_hash(p) for p in reachable_files(path)).encode()).hexdigest()[:16]
