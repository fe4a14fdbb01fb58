"""Small, fast stages for testing the runner and store mechanics (the real stages are tested on SmolLM2)."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.facts import Facts
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext


class ToyStage(Stage):
    """Writes its params and its inputs' content into out.txt, and logs each execution to `calls_file`."""

    libraries = ("pyyaml",)
    calls_file: Path | None = None
    delay = 0.0
    fail_with: BaseException | None = None  # raised once the stage has started writing
    allocate = 0  # bytes held (touched) for a moment, to measure memory accounting

    def run(self, ctx: StageContext) -> dict:
        if self.calls_file is not None:
            with open(self.calls_file, "a") as fh:
                fh.write(f"{self.name}\n")
        time.sleep(self.delay)
        held = b"\x01" * self.allocate  # touched, so resident
        del held
        if self.fail_with is not None:
            raise self.fail_with
        upstream = {name: (a / "out.txt").read_text() for name, a in ctx.inputs.items()}
        (ctx.out / "out.txt").write_text(json.dumps({"params": ctx.params, "upstream": upstream}, sort_keys=True))
        return {"n": len(upstream)}


class ToyLoad(ToyStage):
    name, version, fields = "load", "1", ("model.source",)


class ToyCalibrate(ToyStage):
    name, version, inputs, fields = "calibrate", "1", ("load",), ("calibration",)


class ToyExport(ToyStage):
    name, version, inputs, fields = "export", "1", ("calibrate",), ("export",)


class ToyFacts(Facts):
    n: int


class TypedToyExport(ToyExport):
    """ToyExport with typed facts and one part per export format (a folder holding the format's name)."""

    Facts = ToyFacts
    produce: dict | None = None  # returned instead of the facts, to make a stage whose metadata does not fit

    def parts(self, recipe: Recipe) -> dict:
        return {fmt: {"format": fmt} for fmt in recipe.export.formats}

    def run(self, ctx: StageContext) -> dict:
        facts = super().run(ctx)
        for fmt in ctx.recipe.export.formats:
            if fmt not in ctx.reused:
                (ctx.out / fmt).mkdir()
                (ctx.out / fmt / "weights.bin").write_text(fmt)
        return self.produce if self.produce is not None else facts


def toy_chain(calls_file: Path | None = None, delay: float = 0.0) -> tuple[Stage, ...]:
    chain = (ToyLoad(), ToyCalibrate(), ToyExport())
    for stage in chain:
        stage.calls_file, stage.delay = calls_file, delay
    return chain


def calls(calls_file: Path) -> list[str]:
    return calls_file.read_text().split() if calls_file.exists() else []


def run_concurrently(target: Callable, argument_lists: list[tuple]) -> list[int]:
    """Start one forked process per argument tuple at once; their exit codes once all have finished."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in argument_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]
