"""Run a build matrix on Ray: one task per distinct stage artifact, wired by the artifact keys' input edges.

Each task runs the ordinary runner up to its stage on whichever node Ray picks, so the upstream artifacts must be
reachable there: a store path every node mounts, or a node-local path plus the shared remote tier (`--remote`).
Stages declared by several cells (one calibration serving two targets) are one task. A build that needs a GPU
requests it and a custom resource named after its architecture (`sm_90`), which GPU nodes advertise with
`ray start --resources '{"sm_90": <gpus>}'`, so it lands on a node of the right kind.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import runner
from pipeline.backends import registry
from pipeline.errors import HostLacks, QuantpipeError, VerificationFailed
from pipeline.fmt import parse_size
from pipeline.matrix import Cell, CellResult, EventSink, MatrixSpec
from pipeline.recipe import Recipe
from pipeline.stages import Stage
from pipeline.store import ArtifactStore

# Heavy stages get two CPUs by default: torch inside a Ray task uses as many threads as the task has CPUs.
DEFAULT_CPUS = {"load": 1, "calibrate": 2, "quantize": 2, "export": 2, "build": 2, "verify": 2}


def resources(stage: Stage, recipe: Recipe, spec: MatrixSpec) -> dict:
    """Ray task options for one stage of one cell."""
    asked = spec.resources.get(stage.name)
    options: dict = {"num_cpus": asked.cpus if asked else DEFAULT_CPUS.get(stage.name, 1)}
    if asked and asked.memory:
        options["memory"] = parse_size(asked.memory)
    if stage.name == "build" and registry()[recipe.build.backend].gpu_to_build:
        options["num_gpus"] = 1
        options["resources"] = {recipe.target.gpu: 1}
    return options


def _stage_task(recipe_data: dict, stage: str, store_root: str, remote: str | None, *upstream: dict) -> dict:
    """Bring one stage's artifact into the store (a hit when another task already did). Errors come back as
    data, so a failed upstream stops its dependants with the original message and exit code."""
    failed = next((u for u in upstream if not u["ok"]), None)
    if failed is not None:
        return failed
    recipe = Recipe.model_validate(recipe_data)
    try:
        result = runner.run(recipe, ArtifactStore(store_root, remote), until=stage)
    except QuantpipeError as exc:
        return {"ok": False, "exit_code": exc.exit_code, "error": str(exc), "stage": stage}
    outcome = result.outcomes[-1].to_json()
    if result.failure:
        return {"ok": False, "exit_code": VerificationFailed.exit_code, "error": result.failure, "stage": stage,
                "outcome": outcome}
    return {"ok": True, "exit_code": 0, "stage": stage, "outcome": outcome}


def _cell_task(recipe_data: dict, store_root: str, remote: str | None, engines_dir: str, *upstream: dict) -> dict:
    """The whole chain once every stage exists (all hits): publishes and writes the cell's run record."""
    failed = next((u for u in upstream if not u["ok"]), None)
    if failed is not None:
        return failed
    result = runner.run(Recipe.model_validate(recipe_data), ArtifactStore(store_root, remote),
                        engines_dir=Path(engines_dir))
    return {"ok": True, "exit_code": 0, "stages": [o.to_json() for o in result.outcomes]}


def connect(address: str | None) -> None:
    """Join a running cluster, or start a private local one sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster: no token files in ~/.ray
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=128 << 20,
             log_to_driver=False, logging_level="ERROR")


def run_ray(cells: list[Cell], spec: MatrixSpec, store: ArtifactStore, engines_dir: Path, emit: EventSink,
            address: str | None = None) -> list[CellResult]:
    try:
        import ray
    except ImportError:
        raise HostLacks("--executor ray needs Ray; install the extra: pip install 'quantpipe[ray]'") from None
    connect(address)
    stage_task, cell_task = ray.remote(_stage_task), ray.remote(_cell_task)
    remote_url = store.remote.url if store.remote else None
    available = ray.cluster_resources()
    tasks: dict[tuple[str, str], object] = {}
    cell_refs = {}
    for cell in cells:
        steps = runner.plan(cell.recipe, store)
        keys = {s.stage.name: s.key for s in steps}
        recipe_data = cell.recipe.model_dump(mode="json")
        for step in steps:
            node = (step.stage.name, step.key)
            if node in tasks:
                continue
            options = resources(step.stage, cell.recipe, spec)
            _check_schedulable(options, available, cell, step.stage.name)
            upstream = [tasks[(name, keys[name])] for name in step.record.inputs]
            tasks[node] = stage_task.options(name=f"{step.stage.name}:{step.key[:12]}", **options).remote(
                recipe_data, step.stage.name, str(store.root), remote_url, *upstream)
            emit({"event": "stage_submitted", "cell": cell.name, "stage": step.stage.name, "key": step.key,
                  "status": "hit" if step.hit else "miss", "resources": options})
        cell_refs[cell.name] = cell_task.options(num_cpus=0.1, name=f"cell:{cell.name}").remote(
            recipe_data, str(store.root), remote_url, str(engines_dir), *(tasks[(n, k)] for n, k in keys.items()))
    pending = list(tasks.values())
    while pending:  # stage ends as they happen, for the event stream
        done, pending = ray.wait(pending, num_returns=1)
        finished = ray.get(done[0])
        emit({"event": "stage_end", **{k: v for k, v in finished.items() if k != "outcome"},
              **finished.get("outcome", {})})
    return [_collect(cell, ray.get(cell_refs[cell.name]), emit) for cell in cells]


def _check_schedulable(options: dict, available: dict, cell: Cell, stage: str) -> None:
    """A task no node can run would wait forever: fail before submitting anything."""
    wanted = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0),
              **options.get("resources", {})}
    for name, amount in wanted.items():
        if amount and available.get(name, 0) < amount:
            raise HostLacks(f"cell {cell.name}: stage {stage} needs {amount:g} {name} but the Ray cluster offers "
                            f"{available.get(name, 0):g}; add a node that has it (GPU nodes: ray start "
                            f"--resources '{{\"{name}\": <gpus>}}') or lower resources.{stage}")


def _collect(cell: Cell, result: dict, emit: EventSink) -> CellResult:
    outcome = CellResult(cell, result["ok"], result["exit_code"], result.get("error"), result.get("stages", []))
    emit({"event": "cell_end", **outcome.to_json()})
    return outcome
