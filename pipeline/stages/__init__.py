"""The stage chain, in order. Only the runner chains stages; a stage reads its inputs' artifacts, never their code."""

from __future__ import annotations

from pipeline.errors import BadInput
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.build import Build
from pipeline.stages.calibrate import Calibrate
from pipeline.stages.export import Export
from pipeline.stages.finetune import Finetune
from pipeline.stages.load import Load
from pipeline.stages.quantize import Quantize
from pipeline.stages.reference import Reference
from pipeline.stages.sensitivity import Sensitivity
from pipeline.stages.verify import Verify

# reference (the unquantized model's results) just before verify: a recipe that fails earlier, or a run
# `--until export`, never pays for it.
STAGES: tuple[Stage, ...] = (Load(), Sensitivity(), Calibrate(), Finetune(), Quantize(), Export(), Build(),
                             Reference(), Verify())
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def by_name(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise BadInput(f"unknown stage '{name}'; stages are: {', '.join(NAMES)}")


__all__ = ["NAMES", "STAGES", "Stage", "StageContext", "by_name"]
