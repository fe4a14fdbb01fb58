"""build: an engine or deployable from the exported artifacts, by the backend the recipe names. Keyed on the target
architecture and the backend's versions too, because an engine runs only where it was built for."""

from __future__ import annotations

from pipeline import host
from pipeline.backends.builders import builder, facts_of_builders
from pipeline.errors import BadInput, HostLacks
from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext


class Build(Stage):
    name = "build"
    version = "1"
    inputs = ("load", "calibrate", "export")
    fields = ("build", "target")

    @property
    def Facts(self):  # noqa: N802 (the Stage attribute)
        """Whichever backend built it: each builder declares its facts, told apart by their `backend` field."""
        return facts_of_builders()

    def applies(self, recipe: Recipe) -> bool:
        return recipe.build.backend != "none"

    def environment(self, recipe: Recipe) -> dict:
        backend = builder(recipe.build.backend)
        return {**host.versions(backend.libraries), **backend.environment(recipe)}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        source = builder(recipe.build.backend).info.export
        if source not in recipe.export.formats:
            raise BadInput(f"build.backend {recipe.build.backend} builds from the {source} export: "
                           f"add {source} to export.formats")
        problem = builder(recipe.build.backend).missing(recipe)
        if problem:
            raise HostLacks(problem)

    def summary(self, facts) -> str:
        size = f", {human_bytes(facts.engine_bytes)}" if hasattr(facts, "engine_bytes") else ""
        return f"{facts.backend}{size}"

    def run(self, ctx: StageContext):
        return builder(ctx.recipe.build.backend).build(ctx, ctx.tool_cache)
