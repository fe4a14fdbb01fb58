"""A toy build backend in one file: its description and its builder (tests register it with builders.register)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pipeline.backends import BackendInfo, Builder
from pipeline.facts import Facts


class ToyFacts(Facts):
    backend: Literal["toy"]
    engine_bytes: int


class ToyBuilder(Builder):
    """Builds for Hopper only, from the HF export, without a GPU: writes what it was given into toy.json."""

    info = BackendInfo("toy", export="hf", gpu_to_build=False, gpu_to_run=False, archs=frozenset({90}))
    Facts = ToyFacts

    def build(self, ctx, tool_cache: Path) -> ToyFacts:
        upstream = (ctx.input("export") / "out.txt").read_text()
        (ctx.out / "toy.json").write_text(json.dumps({"export": upstream, "gpu": ctx.recipe.target.gpu}))
        return ToyFacts(backend="toy", engine_bytes=(ctx.out / "toy.json").stat().st_size)

