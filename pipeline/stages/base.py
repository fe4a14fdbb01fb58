"""What a stage is: a name, a version, the upstream stages it reads, the recipe fields and libraries it depends on,
the type of the facts it records, and one `run` that fills a fresh directory and returns those facts. Heavy imports
live inside `run`, so planning stays instant."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pipeline import codeid, host
from pipeline.recipe import Recipe
from pipeline.store import Artifact, ArtifactStore

T = TypeVar("T")


def _no_progress(items: Iterable[T], total: int | None = None, description: str = "") -> Iterable[T]:
    return items


def _no_report(event: dict) -> None:
    pass


@dataclass
class StageContext:
    recipe: Recipe
    params: dict
    inputs: dict[str, Artifact]
    out: Path
    tool_cache: Path  # persists across builds (e.g. TensorRT timing caches): speed only, never an input's identity
    track: Callable[..., Iterable] = field(default=_no_progress)
    # Parts (Stage.parts) an intact artifact of this stage already held under the same part key, already linked
    # into `out` by the runner: part name -> that artifact, whose facts describe the part.
    reused: dict[str, Artifact] = field(default_factory=dict)
    scratch: Path | None = None  # resumable work tied to this key (ArtifactStore.scratch_for), kept across kills
    report: Callable[[dict], None] = field(default=_no_report)  # progress events (a finished layer) for schedulers

    def input(self, stage: str) -> Artifact:
        return self.inputs[stage]



class Stage:
    name: ClassVar[str]
    version: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[tuple[str, ...]] = ()
    libraries: ClassVar[tuple[str, ...]] = ()
    # What `run` returns, validated when it finishes and whenever its artifact is read (a Facts model, or any type
    # pydantic validates); a stage without a model of its own records a plain dict.
    Facts: ClassVar[Any] = dict[str, Any]

    def applies(self, recipe: Recipe) -> bool:
        """False when the recipe asks nothing of this stage (e.g. build backend 'none')."""
        return True

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict[str, Any]:
        """The slice of the recipe (and digests of input files) this stage's output depends on."""
        return {f: recipe.field(f) for f in self.fields}

    def environment(self, recipe: Recipe) -> dict[str, Any]:
        """Host facts this stage's output depends on: library versions, by default."""
        return host.versions(self.libraries)

    def parts(self, recipe: Recipe) -> dict[str, dict[str, Any]]:
        """Subfolders of the artifact keyed on their own, so the runner can link one an earlier artifact of this
        stage already made: part name -> the recipe fields that part reads (its key also covers the stage's inputs,
        code and environment)."""
        return {}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        """Cheap checks before any stage runs: BadInput for inputs that cannot work, HostLacks for a missing GPU
        or library. `model` holds the load artifact's facts when it is already cached ({} otherwise), so
        model-dependent checks run here too. A failure three hours in should have been caught here."""

    def summary(self, facts: Any) -> str:
        """One short phrase about an artifact (given its facts) for the run's summary table."""
        return ""

    def failure(self, facts: Any) -> str | None:
        """A reason to fail the run although the artifact was made (verify's missed thresholds)."""
        return None

    def run(self, ctx: StageContext) -> Any:
        """Write the artifact's files into ctx.out and return its facts (an instance of `Facts`) for the manifest."""
        raise NotImplementedError

    @classmethod
    def code_hash(cls) -> str:
        """Covers the stage's module and every project module it can reach through imports (pipeline.codeid)."""
        return codeid.code_hash(Path(inspect.getsourcefile(cls)))
