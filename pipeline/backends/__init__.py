"""Engine builders behind one interface, chosen by `build.backend` through a registry (not if/else)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.recipe import Recipe

if TYPE_CHECKING:  # stages import backends: no import cycle at run time
    from pipeline.stages.base import StageContext


class Backend(Protocol):
    libraries: tuple[str, ...]

    def missing(self, recipe: Recipe) -> str | None:
        """What this host lacks to build for the recipe's target (None when it can)."""

    def environment(self, recipe: Recipe) -> dict:
        """Host facts the engine depends on beyond library versions (GPU architecture for on-GPU builds)."""

    def build(self, ctx: StageContext, tool_cache: Path) -> dict:
        """Build into ctx.out; `tool_cache` persists builder caches (timing caches) across builds."""


def registry() -> dict[str, Backend]:
    from pipeline.backends.tensorrt_rtx import TensorRTRTX
    from pipeline.backends.trtllm import TrtllmEngine, TrtllmPytorch

    return {"tensorrt-rtx": TensorRTRTX(), "trtllm": TrtllmEngine(), "trtllm-pytorch": TrtllmPytorch()}
