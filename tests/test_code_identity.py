"""Code identity is derived from the code: a stage's key covers every project module it can reach through imports
(pipeline/codeid.py), and the package's import graph has no cycles."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline import codeid

PACKAGE = Path(codeid.__file__).parent

PLAN_KEYS = ("import json, sys; from pipeline import runner; from pipeline.recipe import load_recipe; "
             "from pipeline.store import ArtifactStore; "
             "steps = runner.plan(load_recipe('fp8', ['build.backend=none']), ArtifactStore(sys.argv[1])); "
             "print(json.dumps({s.stage.name: s.key for s in steps}))")


def plan_keys(root: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PLAN_KEYS, str(cache)], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return json.loads(out)


def test_editing_a_module_only_verify_reaches_changes_the_verify_key_alone(tmp_path):
    """backends/tensorrt_rtx.py is imported inside a verify function; no list names it, yet editing it must
    invalidate cached verifications (and nothing upstream of verify)."""
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "calib_data").symlink_to(PACKAGE.parent / "calib_data")
    before = plan_keys(tmp_path, tmp_path / "cache")
    with open(tmp_path / "pipeline" / "backends" / "tensorrt_rtx.py", "a") as fh:
        fh.write("\n\ndef changed_behaviour():\n    return 1\n")
    after = plan_keys(tmp_path, tmp_path / "cache")
    assert [stage for stage in before if before[stage] != after[stage]] == ["verify"]


def test_comments_and_docstrings_do_not_change_the_code_identity(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('def f():\n    return 1\n')
    first = codeid.source_hash(module)
    module.write_text('"""Documented."""\n\n\ndef f():\n    """Now with a docstring."""\n    return 1  # and a comment\n')
    codeid.source_hash.cache_clear()
    assert codeid.source_hash(module) == first


def test_the_package_import_graph_has_no_cycles():
    """Imports inside functions count: a cycle there is still two modules that cannot be understood apart."""
    modules = {_module_name(path): set(codeid.imported_modules(path)) for path in PACKAGE.rglob("*.py")}
    graph = {name: {codeid.module_file(m) and m for m in imports} - {None, name, "pipeline"}
             for name, imports in modules.items()}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, [*trail, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert cycles == []


def _module_name(path: Path) -> str:
    parts = [p for p in path.relative_to(PACKAGE).with_suffix("").parts if p != "__init__"]
    return ".".join(["pipeline", *parts])
