"""build: an engine or deployable from the exported artifacts, by the backend the recipe names. Keyed on the target
architecture and the backend's versions too, because an engine runs only where it was built for."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from pipeline import host
from pipeline.backends.builders import builder
from pipeline.errors import BadInput, HostLacks
from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
from pipeline.stages.base import Facts, Stage, StageContext


class TensorRTRTXFacts(Facts):
    """A TensorRT-RTX engine compiled ahead of time: for which GPUs, with which profile, and the Q/DQ layers the
    builder saw."""

    backend: Literal["tensorrt-rtx"]
    engine_bytes: int
    tensorrt_rtx: str
    compute_capability: str  # e.g. "SM89,SM120"
    build_seconds: float
    profile: dict[str, tuple[int, int, int]]  # min, opt, max of batch, new tokens and past tokens
    quantize_layers: dict[str, int]
    checks: list[str]
    not_checked: str


class TrtllmEngineFacts(Facts):
    backend: Literal["trtllm"]
    engine_bytes: int
    command: list[str]
    engines: int
    tensorrt_llm: str | None


class TrtllmPytorchFacts(Facts):
    backend: Literal["trtllm-pytorch"]
    options: dict[str, Any]
    tensorrt_llm: str | None


BuildFacts = Annotated[TensorRTRTXFacts | TrtllmEngineFacts | TrtllmPytorchFacts, Field(discriminator="backend")]


class Build(Stage):
    name = "build"
    version = "1"
    inputs = ("load", "calibrate", "export")
    fields = ("build", "target")
    Facts = BuildFacts

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

    def summary(self, facts: BuildFacts) -> str:
        size = f", {human_bytes(facts.engine_bytes)}" if hasattr(facts, "engine_bytes") else ""
        return f"{facts.backend}{size}"

    def run(self, ctx: StageContext) -> BuildFacts:
        return builder(ctx.recipe.build.backend).build(ctx, ctx.tool_cache)
