"""The runner: plans the stage chain (keys, hits, misses and why), then runs the misses in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import host, runs, targets
from pipeline.errors import BadInput, QuantpipeError, VerificationFailed
from pipeline.keys import KeyRecord
from pipeline.publish import publish
from pipeline.recipe import Recipe
from pipeline.stages import STAGES, Stage, StageContext
from pipeline.store import Artifact, ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class Step:
    stage: Stage
    key: str
    record: KeyRecord
    artifact: Artifact | None
    forced: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def hit(self) -> bool:
        return self.artifact is not None and not self.forced


@dataclass
class Outcome:
    stage: str
    key: str
    status: str  # "hit", "built", or "shared" (built meanwhile by a concurrent run)
    seconds: float
    artifact: Artifact

    def to_json(self) -> dict:
        return {"stage": self.stage, "key": self.key, "status": self.status, "seconds": round(self.seconds, 3),
                "bytes": self.artifact.size, "peak_rss_bytes": self.artifact.manifest.get("peak_rss_bytes"),
                "path": str(self.artifact.path), "metadata": self.artifact.metadata}


@dataclass
class RunResult:
    outcomes: list[Outcome]
    failure: str | None = None  # a stage made its artifact but the run must fail (verify below threshold)
    published: Path | None = None
    record: Path | None = None  # this run's record under <cache>/runs/

    def raise_failure(self) -> None:
        if self.failure:
            raise VerificationFailed(self.failure)


class Reporter:
    """Hooks the runner calls; the CLI supplies one that draws progress. The default stays silent."""

    def stage_started(self, step: Step) -> None: ...

    def stage_finished(self, outcome: Outcome) -> None: ...

    def track(self, items: Iterable, total: int | None = None, description: str = "") -> Iterable:
        return items

    def stage_progress(self, stage: str, event: dict) -> None:
        """Progress inside a stage (a finished layer); `event["message"]`, when present, is for people."""


def _index(stages: tuple[Stage, ...], name: str) -> int:
    names = [s.name for s in stages]
    if name not in names:
        raise BadInput(f"unknown stage '{name}'; stages are: {', '.join(names)}")
    return names.index(name)


def check_target(recipe: Recipe) -> None:
    q = recipe.quantization
    for gpu in recipe.gpus:
        # format auto: the map and every candidate it may pick must run there
        for fmt in (q.format, *(q.auto.candidates if q.auto else ())):
            targets.check(gpu, fmt, q.kv_cache, recipe.build.backend, recipe.export.formats)


def plan(recipe: Recipe, store: ArtifactStore, *, until: str | None = None, force: Iterable[str] = (),
         stages: tuple[Stage, ...] = STAGES) -> list[Step]:
    """Keys and hit/miss for each stage, without running or importing anything heavy."""
    check_target(recipe)
    last = _index(stages, until) if until else len(stages) - 1
    forced_from = min((_index(stages, f) for f in force), default=len(stages))
    previous = (runs.latest(store, recipe.name) or {}).get("stages", {})
    steps: list[Step] = []
    keys: dict[str, str] = {}
    for position, stage in enumerate(stages[: last + 1]):
        if not stage.applies(recipe):
            continue
        record = KeyRecord(stage.name, stage.version, stage.code_hash(), stage.params(recipe, store),
                           {name: keys[name] for name in stage.inputs if name in keys}, stage.environment(recipe))
        key = keys[stage.name] = record.key()
        forced = position >= forced_from
        step = Step(stage, key, record, store.peek(stage.name, key, facts=stage.Facts), forced)
        if not step.hit:
            step.reasons = _why(stage.name, key, record, previous.get(stage.name), forced, store)
        steps.append(step)
    return _needed_by(steps, until) if until else steps


def _needed_by(steps: list[Step], until: str) -> list[Step]:
    """The steps `until` needs, directly or through its inputs, and its own: `--until verify` runs everything,
    `--until export` not the reference stage that only verify reads. (A stage the recipe skips: all before it.)"""
    if until not in {s.stage.name for s in steps}:
        return steps
    needed = {until}
    for step in reversed(steps):
        if step.stage.name in needed:
            needed.update(step.record.inputs)
    return [s for s in steps if s.stage.name in needed]


def run(recipe: Recipe, store: ArtifactStore, *, until: str | None = None, force: Iterable[str] = (),
        reporter: Reporter | None = None, stages: tuple[Stage, ...] = STAGES,
        engines_dir: Path | None = None) -> RunResult:
    """Run the chain: hits are skipped, misses built under a per-key lock. A complete, passing run is published
    under `engines_dir` when one is given. Every run, passed or failed for any reason, leaves a run record."""
    reporter = reporter or Reporter()
    started = time.time()
    steps: list[Step] = []
    outcomes: list[Outcome] = []
    try:
        steps = plan(recipe, store, until=until, force=force, stages=stages)
        store.ensure_writable()
        model = next((s.artifact.metadata for s in steps if s.stage.name == "load" and s.artifact), {})
        for step in steps:
            if not step.hit:
                step.stage.preflight(recipe, model)
        artifacts: dict[str, Artifact] = {}
        facts_types = {s.stage.name: s.stage.Facts for s in steps}
        failure = None
        for step in steps:
            reporter.stage_started(step)
            t0 = time.time()
            read = any(step.stage.name in later.record.inputs for later in steps if not later.hit)  # re-hash it
            cached = (store.get(step.stage.name, step.key, deep=read, facts=step.stage.Facts)  # pulled if only remote
                      if step.hit else None)
            artifact, status = (cached, "hit") if cached else _build(step, recipe, store, artifacts, facts_types,
                                                                            reporter)
            artifacts[step.stage.name] = artifact
            outcome = Outcome(step.stage.name, step.key, status, time.time() - t0, artifact)
            outcomes.append(outcome)
            reporter.stage_finished(outcome)
            failure = step.stage.failure(artifact.facts)
            if failure:
                break
        published = None
        if engines_dir is not None and until is None and failure is None:
            published = publish(Path(engines_dir), recipe, artifacts, store)
    except BaseException as exc:
        try:
            _write_run_record(store, recipe, steps, outcomes, started, exc)
        except OSError:
            pass  # an unwritable cache is itself the error being raised
        raise
    record = _write_run_record(store, recipe, steps, outcomes, started, VerificationFailed(failure) if failure
                               else None)
    return RunResult(outcomes, failure, published, record)


def _build(step: Step, recipe: Recipe, store: ArtifactStore, artifacts: dict[str, Artifact],
           facts_types: dict[str, Any], reporter: Reporter) -> tuple[Artifact, str]:
    stage, name = step.stage, step.stage.name
    with store.lock(name, step.key):
        if not step.forced and (shared := store.get(name, step.key, facts=stage.Facts)) is not None:
            return shared, "shared"
        inputs = {}
        for upstream in step.record.inputs:
            artifact = store.get(upstream, artifacts[upstream].key, facts=facts_types[upstream])
            if artifact is None:
                raise BadInput(f"input {upstream} of {name} was damaged or removed during the run; run again")
            inputs[upstream] = artifact
        parts = {part: step.record.part(part, fields).key() for part, fields in stage.parts(recipe).items()}
        manifest_record = {**step.record.to_json(), "recipe": recipe.name, **({"parts": parts} if parts else {})}

        def build(out: Path):
            tool_cache = store.root / "tools" / name
            tool_cache.mkdir(parents=True, exist_ok=True)
            reused = store.link_parts(name, parts, out, facts=stage.Facts)
            ctx = StageContext(recipe, step.record.params, inputs, out, tool_cache, reporter.track, reused,
                               store.scratch_for(name, step.key), lambda event: reporter.stage_progress(name, event))
            with host.PeakMemory() as peak:
                produced = stage.run(ctx)
            # store.write puts the record in the manifest after build
            manifest_record.update(peak_rss_bytes=peak.bytes, **({"reused_parts": sorted(reused)} if parts else {}))
            return produced

        return store.write(name, step.key, build, manifest_record, facts=stage.Facts), "built"


def _why(stage: str, key: str, record: KeyRecord, before: dict | None, forced: bool,
         store: ArtifactStore) -> list[str]:
    """Human reasons for a miss: what differs from the last run of this recipe or, when that run never built this
    stage, from the nearest artifact of this stage in the store (whichever recipe made it)."""
    if forced:
        return ["forced"]
    if before is not None and before.get("key") == key:
        return ["artifact missing or damaged"]
    suffix = ""
    if before is None:
        nearest = min((a.manifest for a in store.artifacts(stage) if a.manifest),
                      key=lambda m: len(_differences(KeyRecord.from_json(stage, m), record)), default=None)
        if nearest is None:
            return ["never built"]
        before = nearest
        suffix = f" (vs cached {nearest['key'][:12]} of recipe {nearest.get('recipe', '?')})"
    reasons = _differences(KeyRecord.from_json(stage, before), record)
    return [f"{reason}{suffix}" for reason in reasons] or ["key changed"]


def _differences(before: KeyRecord, record: KeyRecord) -> list[str]:
    old, new = _flatten(before.params), _flatten(record.params)
    reasons = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]
    reasons += [f"input {k} changed" for k, v in record.inputs.items() if before.inputs.get(k) != v]
    reasons += [f"{k} {before.environment.get(k)} -> {v}" for k, v in record.environment.items()
                if before.environment.get(k) != v]
    if (before.stage_version, before.code) != (record.stage_version, record.code):
        reasons.append("stage code changed")
    return reasons


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _write_run_record(store: ArtifactStore, recipe: Recipe, steps: list[Step], outcomes: list[Outcome],
                      started: float, error: BaseException | None) -> Path:
    failed_stage = None
    if isinstance(error, VerificationFailed):
        failed_stage = outcomes[-1].stage
    elif error is not None and steps:  # past the last stage, publishing failed
        failed_stage = steps[len(outcomes)].stage.name if len(outcomes) < len(steps) else "publish"
    record = {
        "ok": error is None,
        "exit_code": exit_code(error),
        "error": None if error is None else one_line(error),
        "failed_stage": failed_stage,
        "recipe": recipe.model_dump(mode="json"),
        "started": runs.stamp(started),
        "seconds": round(time.time() - started, 3),
        "host": host.describe(),
        "stages": {s.stage.name: {"key": s.key, **s.record.to_json()} for s in steps},
        "outcomes": [o.to_json() for o in outcomes],
    }
    return runs.write(store, recipe.name, record, started)


def exit_code(error: BaseException | None) -> int:
    """The process exit code a run ending with `error` gets (the table in README.md)."""
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        return 130
    return getattr(error, "exit_code", 1)


def one_line(error: BaseException) -> str:
    """The error as one line; unexpected errors keep their type, which is what a bug report needs first."""
    text = " ".join(str(error).split())
    return text if isinstance(error, QuantpipeError) else f"{type(error).__name__}: {text}".rstrip(": ")
