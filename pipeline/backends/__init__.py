"""Build backends describe themselves: which architectures each builds for, the export it builds from, which
formats it takes, whether it needs a GPU to build and to run what it makes, and whether verify runs that artifact.

These descriptions are light data that targets, the recipe, architectures and the Ray executor read; the code that
builds and runs (pipeline/backends/builders.py and one module per backend) is reached only by the build stage and
verify, so editing a builder invalidates only what it builds. Adding a backend: a `BackendInfo` below (or
`register`ed by a plugin) and its `Builder` module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What TensorRT-RTX 1.7 compiles for (trt.ComputeCapability): consumer Ampere/Ada and Blackwell RTX only.
RTX_ARCHS = frozenset({80, 86, 89, 120, 121})


@dataclass(frozen=True)
class BackendInfo:
    name: str  # build.backend
    export: str  # the export it builds from (defaulted into export.formats, checked by the build stage)
    gpu_to_build: bool  # building needs a GPU of the target architecture (the Ray executor requests one)
    gpu_to_run: bool = True
    archs: frozenset[int] | None = None  # the architectures it builds for; None: sm_80 and newer
    several_gpus: bool = False  # one artifact holds several compute capabilities (build.also_for)
    verify_runs: bool = False  # verify runs what it makes (Builder.runnable_here / decoder)
    verify_note: str = ""  # what the build itself already proved, for verify's report

    def runs_on(self, sm: int) -> bool:
        return sm in self.archs if self.archs is not None else sm >= 80

    def refusal(self, fmt) -> str | None:
        """Why it cannot build the QuantFormat `fmt`: the format's own refusal of this backend or of its export."""
        return fmt.refusal(self.name) or fmt.refusal(self.export)


_INFOS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("tensorrt-rtx", export="onnx", gpu_to_build=False, archs=RTX_ARCHS, several_gpus=True,
                verify_runs=True),
    BackendInfo("trtllm", export="trtllm", gpu_to_build=True),
    BackendInfo("trtllm-pytorch", export="hf", gpu_to_build=True,
                verify_note=" (the build loaded it and generated once)"),
)}


def register(info: BackendInfo) -> BackendInfo:
    """Add a backend's description (a plugin, or a test's toy; its Builder goes to builders.register)."""
    _INFOS[info.name] = info
    return info


def registry() -> dict[str, BackendInfo]:
    return dict(_INFOS)


class Builder:
    info: BackendInfo
    libraries: tuple[str, ...] = ()  # distributions whose versions key the build
    Facts: type  # the pydantic model (pipeline.facts.Facts) of what `build` returns; its `backend` field tells it apart

    def missing(self, recipe) -> str | None:
        """What this host lacks to build for the recipe's target (None when it can)."""
        return None

    def environment(self, recipe) -> dict:
        """Host facts the artifact depends on beyond library versions (GPU architecture for on-GPU builds)."""
        return {}

    def build(self, ctx, tool_cache: Path):
        """Build into ctx.out from ctx's inputs; `tool_cache` persists builder caches (timing caches) across builds."""
        raise NotImplementedError

    def runnable_here(self, metadata: dict) -> str | None:
        """The GPU on this host that can run the built artifact, or None (verify then says why it did not run)."""
        return None

    def decoder(self, folder: Path):
        """The built artifact in `folder` as an onnx_export.StepDecoder (for verify, where runnable_here)."""
        raise NotImplementedError(f"{self.info.name} artifacts are not run by verify")
