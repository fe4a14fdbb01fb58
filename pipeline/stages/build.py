"""build: an engine or deployable from the exported artifacts, by the backend the recipe names. Keyed on the target
architecture and the backend's versions too, because an engine runs only where it was built for."""

from __future__ import annotations

from pipeline import host
from pipeline.backends.builders import builder
from pipeline.errors import BadInput, HostLacks
from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext


class Build(Stage):
    name = "build"
    version = "1"
    inputs = ("load", "calibrate", "export")
    fields = ("build", "target")

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

    def summary(self, metadata: dict) -> str:
        size = f", {human_bytes(metadata['engine_bytes'])}" if "engine_bytes" in metadata else ""
        return f"{metadata['backend']}{size}"

    def run(self, ctx: StageContext) -> dict:
        return builder(ctx.recipe.build.backend).build(ctx, ctx.tool_cache)
