"""The GPU support matrix as data, and the check every recipe passes before any work.

Sources (checked 2026-11):
- ModelOpt "Quantization formats / support matrix" guide: FP8 needs Ada (sm_89) or newer; NVFP4 and MXFP4 are
  Blackwell-only (sm_100+); INT8 SmoothQuant and INT4 AWQ run on Ampere (sm_80) and newer; W4A8 AWQ needs FP8
  activations, so Ada or newer.
- TensorRT-LLM "Numerical precision" and "Support matrix" pages: the same hardware floors for FP8 / FP8 KV cache,
  NVFP4 / NVFP4 KV cache (Blackwell), INT8-SQ and INT4/W4A8 AWQ; TensorRT-LLM targets sm_80 and newer.
- TensorRT-RTX 1.7 Python API: `trt.ComputeCapability` offers SM75, SM80, SM86, SM89, SM120 and SM121 only, so
  datacenter Hopper and Blackwell (sm_90, sm_100, sm_103) are TensorRT-LLM's job; FP4 needs SM120/121.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import backends, formats
from pipeline.errors import BadInput, UnsupportedOnTarget


@dataclass(frozen=True)
class GpuArch:
    sm: int
    family: str
    products: str

    @property
    def label(self) -> str:
        return f"{self.family} (sm_{self.sm})"


ARCHS: dict[int, GpuArch] = {
    a.sm: a
    for a in (
        GpuArch(80, "ampere", "A100, A30"),
        GpuArch(86, "ampere", "A10, A40, RTX 30xx"),
        GpuArch(89, "ada", "L4, L40S, RTX 40xx"),
        GpuArch(90, "hopper", "H100, H200, GH200"),
        GpuArch(100, "blackwell", "B200, GB200"),
        GpuArch(103, "blackwell", "B300, GB300"),
        GpuArch(120, "blackwell-rtx", "RTX 50xx, RTX PRO 6000 Blackwell"),
        GpuArch(121, "blackwell-rtx", "DGX Spark (GB10)"),
    )
}

# A family name stands for its first member: "blackwell" means the datacenter part, sm_100.
ALIASES: dict[str, int] = {"ampere": 80, "ada": 89, "hopper": 90, "blackwell": 100, "blackwell-rtx": 120}



def _from(min_sm: int) -> frozenset[int]:
    return frozenset(sm for sm in ARCHS if sm >= min_sm)


def format_archs() -> dict[str, frozenset[int]]:
    """Weight/activation formats (pipeline/formats/): where each runs natively."""
    return {name: _from(f.min_sm) for name, f in formats.FORMATS.items()}


def kv_cache_archs() -> dict[str, frozenset[int]]:
    return {name: _from(kv.min_sm) for name, kv in formats.KV_CACHES.items()}


def backend_archs() -> dict[str, frozenset[int]]:
    """Build backends (pipeline/backends/) and the architectures each builds for; none builds nothing."""
    return {"none": frozenset(ARCHS),
            **{name: frozenset(sm for sm in ARCHS if b.runs_on(sm)) for name, b in backends.registry().items()}}


def backend_refusal(backend: str, fmt: str) -> str | None:
    """Why a build backend cannot build a format (None when it can; none builds nothing, so it takes every one)."""
    return None if backend == "none" else backends.registry()[backend].refusal(formats.get(fmt))


def resolve(name: str) -> GpuArch:
    """Turn 'ada', 'sm_89', 'sm89' or '89' into a GpuArch; BadInput for anything else."""
    text = str(name).strip().lower()
    sm = ALIASES.get(text)
    if sm is None:
        digits = text.removeprefix("sm").lstrip("_")
        sm = int(digits) if digits.isdigit() else None
    if sm not in ARCHS:
        known = ", ".join([*ALIASES, *(f"sm_{s}" for s in ARCHS)])
        raise BadInput(f"target.gpu: unknown GPU '{name}'; use one of {known}")
    return ARCHS[sm]


def _supported_on(table: dict[str, frozenset[int]], sm: int) -> list[str]:
    return [name for name, archs in table.items() if sm in archs]


def _needs(archs: frozenset[int]) -> str:
    return ", ".join(ARCHS[sm].label for sm in sorted(archs))


def check(gpu: str, fmt: str, kv_cache: str, backend: str, exports: tuple[str, ...] = ()) -> GpuArch:
    """Raise UnsupportedOnTarget, naming what the target supports instead, unless all parts run on `gpu` and the
    format can be exported as each of `exports` and built by the backend."""
    arch = resolve(gpu)
    for what, table, value in (
        ("quantization.format", format_archs(), fmt),
        ("quantization.kv_cache", kv_cache_archs(), kv_cache),
        ("build.backend", backend_archs(), backend),
    ):
        if arch.sm not in table[value]:
            options = ", ".join(_supported_on(table, arch.sm))
            raise UnsupportedOnTarget(
                f"{what} '{value}' does not run on {arch.label}; it needs {_needs(table[value])}. "
                f"{arch.label} supports: {options}"
            )
    for export in exports:
        if reason := formats.get(fmt).refusal(export):
            raise UnsupportedOnTarget(f"quantization.format '{fmt}' cannot be exported as {export}: {reason}; "
                                      f"remove {export} from export.formats")
    if reason := backend_refusal(backend, fmt):
        options = ", ".join(f for f in formats.FORMATS if backend_refusal(backend, f) is None)
        raise UnsupportedOnTarget(
            f"build.backend '{backend}' cannot build quantization.format '{fmt}' ({reason}); it builds: {options}"
        )
    return arch


def matrix() -> list[dict]:
    """One row per architecture: what it runs natively (for `quantpipe targets`)."""
    return [
        {
            "sm": f"sm_{a.sm}",
            "family": a.family,
            "products": a.products,
            "formats": _supported_on(format_archs(), a.sm),
            "kv_cache": _supported_on(kv_cache_archs(), a.sm),
            "backends": [b for b in _supported_on(backend_archs(), a.sm) if b != "none"],
        }
        for a in ARCHS.values()
    ]


def default_backend(gpus: list[int], fmt: str) -> str:
    """What `build.backend: auto` means: a backend that builds without a GPU (ahead of time, on any host) where
    every target runs it and it can build the format, else no engine build."""
    return next((name for name, b in backends.registry().items() if not b.gpu_to_build
                 and all(b.runs_on(sm) for sm in gpus) and fmt in formats.FORMATS
                 and backend_refusal(name, fmt) is None), "none")
