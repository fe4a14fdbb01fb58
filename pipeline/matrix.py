"""Build matrices: one base recipe times axes (models, formats, targets, variants), each cell an ordinary recipe.

Cells share stages through the artifact store's keys, not through any matrix logic: two targets of one format have
the same load, calibrate, quantize and export keys, so those are built once. The local executor runs the cells in
order; `pipeline.ray_executor` runs each distinct stage as a Ray task.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from pipeline import host, runner, runs
from pipeline.errors import BadInput, QuantpipeError, UnsupportedOnTarget, VerificationFailed
from pipeline.recipe import (
    NAME_PATTERN,
    Format,
    Recipe,
    Section,
    canonical_format,
    describe_error,
    load_recipe,
    parse_yaml,
    presets,
)
from pipeline.store import ArtifactStore

EventSink = Callable[[dict], None]


class StageResources(Section):
    cpus: float = Field(1, gt=0)
    memory: str | None = Field(None, description="e.g. 8G; reserved on the Ray node, none = not accounted")


class Axes(Section):
    models: tuple[str | None, ...] = Field((None,), description="model.source values; null = the bundled model")
    formats: tuple[str, ...] = Field((), description="preset names (their quantization section) or format names")
    targets: tuple[str, ...] = Field((), description="target GPUs (ada, hopper, sm_120, ...)")
    variants: dict[str, dict[str, Any]] = Field({}, description="named sets of dotted overrides, e.g. tp2")

    @field_validator("formats")
    @classmethod
    def _one_spelling(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(canonical_format(v) for v in values)


class MatrixSpec(Section):
    name: str = Field("matrix", pattern=NAME_PATTERN)
    base: str = Field("default", description="preset or recipe file every cell starts from")
    set: dict[str, Any] = Field({}, description="dotted overrides applied to every cell")
    axes: Axes = Axes()
    exclude: tuple[dict[str, str | None], ...] = Field((), description="partial cells to leave out")
    resources: dict[str, StageResources] = Field({}, description="Ray resource requests per stage name")

    @field_validator("exclude")
    @classmethod
    def _one_spelling(cls, rules: tuple[dict, ...]) -> tuple[dict, ...]:
        return tuple({k: canonical_format(v) if k == "format" else v for k, v in rule.items()} for rule in rules)


@dataclass(frozen=True)
class Cell:
    name: str
    axes: dict[str, str | None]
    recipe: Recipe


@dataclass
class CellResult:
    cell: Cell
    ok: bool
    exit_code: int
    error: str | None = None
    stages: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"cell": self.cell.name, "axes": self.cell.axes, "ok": self.ok, "exit_code": self.exit_code,
                "error": self.error, "stages": self.stages}


def load_matrix(path: Path) -> MatrixSpec:
    if not path.is_file():
        raise BadInput(f"matrix file {path} not found; pass a YAML file with base, set and axes")
    data = parse_yaml(path.read_text(), str(path))
    try:
        spec = MatrixSpec.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"{path}: {_describe_matrix(exc)}") from None
    base = Path(spec.base)
    if base.suffix in (".yaml", ".yml") and not base.is_absolute():
        spec = spec.model_copy(update={"base": str(path.parent / base)})  # relative to the matrix file
    return spec


def _describe_matrix(exc: ValidationError) -> str:
    err = exc.errors()[0]
    if err["type"] == "extra_forbidden":
        return f"unknown key '{'.'.join(map(str, err['loc']))}'; valid keys: {', '.join(MatrixSpec.model_fields)}, " \
               f"axes: {', '.join(Axes.model_fields)}"
    return describe_error(exc)


def expand(spec: MatrixSpec) -> list[Cell]:
    """Every cell, validated and checked against its target before any work; an unsupported cell stops the
    matrix (exit 3) and names the exclude entry that would drop it."""
    axes = {"model": spec.axes.models, "format": spec.axes.formats or (None,),
            "target": spec.axes.targets or (None,), "variant": tuple(spec.axes.variants) or (None,)}
    varying = [name for name, values in axes.items() if len(values) > 1]
    cells = []
    for values in itertools.product(*axes.values()):
        chosen = dict(zip(axes, values))
        if any(all(chosen.get(k) == v for k, v in rule.items()) for rule in spec.exclude):
            continue
        name = "-".join([spec.name, *(_slug(chosen[a]) for a in varying)])
        recipe = _cell_recipe(spec, chosen, name)
        try:
            runner.check_target(recipe)
        except UnsupportedOnTarget as exc:
            rule = ", ".join(f"{k}: {v}" for k, v in chosen.items() if v is not None and k in ("format", "target"))
            raise UnsupportedOnTarget(f"cell {name}: {exc} (leave it out with exclude: [{{{rule}}}])") from None
        cells.append(Cell(name, chosen, recipe))
    if not cells:
        raise BadInput("the matrix has no cells left after exclude; loosen exclude or add axis values")
    return cells


def _cell_recipe(spec: MatrixSpec, chosen: dict, name: str) -> Recipe:
    overrides = [f"{k}={json.dumps(v)}" for k, v in spec.set.items()]
    if chosen["model"] is not None:
        overrides.append(f"model.source={json.dumps(chosen['model'])}")
    if chosen["format"] is not None:
        overrides.append(f"quantization={json.dumps(_quantization_section(chosen['format']))}")
    if chosen["target"] is not None:
        overrides.append(f"target.gpu={json.dumps(chosen['target'])}")
    if chosen["variant"] is not None:
        overrides += [f"{k}={json.dumps(v)}" for k, v in spec.axes.variants[chosen["variant"]].items()]
    if len(name) > 64:
        raise BadInput(f"cell name {name} is over 64 characters; shorten the matrix name or the axis values")
    try:
        return load_recipe(spec.base, [*overrides, f"name={name}"])
    except BadInput as exc:
        raise BadInput(f"cell {name}: {exc}") from None


def _quantization_section(value: str) -> dict:
    """A preset's whole quantization section (format, algorithm, block size, KV cache), or just a format."""
    if value in presets():
        return load_recipe(value).quantization.model_dump(mode="json")
    if value in Format.__args__:
        return {"format": value}
    raise BadInput(f"axes.formats: '{value}' is neither a preset ({', '.join(presets())}) nor a format "
                   f"({', '.join(Format.__args__)})")


def _slug(value: str | None) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", Path(str(value or "bundled")).name.lower()).strip("-.")[:24] or "x"


def plan(cells: list[Cell], store: ArtifactStore) -> dict[str, list[runner.Step]]:
    return {cell.name: runner.plan(cell.recipe, store) for cell in cells}


def run_local(cells: list[Cell], store: ArtifactStore, engines_dir: Path, emit: EventSink,
              reporter_for: Callable[[Cell], runner.Reporter] = lambda cell: runner.Reporter()) -> list[CellResult]:
    """Cells in order; a failing cell is recorded and the rest still run (a nightly build reports all of them)."""
    results = []
    for cell in cells:
        results.append(_run_cell(cell, store, engines_dir, reporter_for(cell)))
        emit({"event": "cell_end", **results[-1].to_json()})
    return results


def _run_cell(cell: Cell, store: ArtifactStore, engines_dir: Path, reporter: runner.Reporter) -> CellResult:
    try:
        result = runner.run(cell.recipe, store, reporter=reporter, engines_dir=engines_dir)
    except QuantpipeError as exc:
        return CellResult(cell, False, exc.exit_code, str(exc))
    failed = result.failure is not None
    return CellResult(cell, not failed, VerificationFailed.exit_code if failed else 0, result.failure,
                      [o.to_json() for o in result.outcomes])


def write_summary(store: ArtifactStore, spec: MatrixSpec, executor: str, results: list[CellResult],
                  started: float) -> Path:
    """The matrix's run summary beside the per-recipe run records (`latest-matrix-<name>.json`, see pipeline.runs)."""
    summary = {"matrix": spec.name, "executor": executor, "ok": all(r.ok for r in results),
               "started": runs.stamp(started), "seconds": round(time.time() - started, 3), "host": host.describe(),
               "cells": [r.to_json() for r in results]}
    return runs.write(store, f"matrix-{spec.name}", summary, started)
