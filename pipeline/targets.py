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

_AMPERE_UP = frozenset(ARCHS)
_ADA_UP = frozenset(sm for sm in ARCHS if sm >= 89)
_BLACKWELL = frozenset(sm for sm in ARCHS if sm >= 100)

# Weight/activation formats: where each runs natively.
FORMATS: dict[str, frozenset[int]] = {
    "fp8": _ADA_UP,
    "int8_sq": _AMPERE_UP,
    "int4_awq": _AMPERE_UP,
    "w4a8_awq": _ADA_UP,
    "nvfp4": _BLACKWELL,
    "nvfp4_awq": _BLACKWELL,
}

KV_CACHE_FORMATS: dict[str, frozenset[int]] = {
    "none": _AMPERE_UP,
    "fp8": _ADA_UP,
    "nvfp4": _BLACKWELL,
}

BUILD_BACKENDS: dict[str, frozenset[int]] = {
    "none": _AMPERE_UP,
    "tensorrt-rtx": frozenset({80, 86, 89, 120, 121}),
    "trtllm": _AMPERE_UP,
    "trtllm-pytorch": _AMPERE_UP,
}

# Formats each engine builder can express (TensorRT-RTX has no W4A8 or FP8 KV cache path in ONNX Q/DQ form).
BACKEND_FORMATS: dict[str, frozenset[str]] = {
    "none": frozenset(FORMATS),
    "tensorrt-rtx": frozenset({"fp8", "int8_sq", "int4_awq", "nvfp4", "nvfp4_awq"}),
    "trtllm": frozenset(FORMATS),
    "trtllm-pytorch": frozenset(FORMATS),
}

# The export each build backend builds from (checked by the build stage, defaulted into export.formats).
BACKEND_EXPORTS: dict[str, str] = {"tensorrt-rtx": "onnx", "trtllm": "trtllm", "trtllm-pytorch": "hf"}


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


def check(gpu: str, fmt: str, kv_cache: str, backend: str) -> GpuArch:
    """Raise UnsupportedOnTarget, naming what the target supports instead, unless all parts run on `gpu`."""
    arch = resolve(gpu)
    for what, table, value in (
        ("quantization.format", FORMATS, fmt),
        ("quantization.kv_cache", KV_CACHE_FORMATS, kv_cache),
        ("build.backend", BUILD_BACKENDS, backend),
    ):
        if arch.sm not in table[value]:
            options = ", ".join(_supported_on(table, arch.sm))
            raise UnsupportedOnTarget(
                f"{what} '{value}' does not run on {arch.label}; it needs {_needs(table[value])}. "
                f"{arch.label} supports: {options}"
            )
    if fmt not in BACKEND_FORMATS[backend]:
        options = ", ".join(sorted(BACKEND_FORMATS[backend]))
        raise UnsupportedOnTarget(
            f"build.backend '{backend}' cannot build quantization.format '{fmt}'; it builds: {options}"
        )
    return arch


# Where a per-layer format map (format auto) can go: the ONNX decoder takes one Q/DQ format, so no TensorRT-RTX.
MIXED_PRECISION_BACKENDS = frozenset({"none", "trtllm", "trtllm-pytorch"})
MIXED_PRECISION_EXPORTS = frozenset({"hf", "trtllm"})


def check_mixed_precision(backend: str, exports: tuple[str, ...]) -> None:
    """UnsupportedOnTarget unless the build backend and every export take a per-layer format map."""
    if backend not in MIXED_PRECISION_BACKENDS:
        raise UnsupportedOnTarget(f"build.backend '{backend}' cannot build quantization.format 'auto' (per-layer "
                                  f"formats); use build.backend {' or '.join(sorted(MIXED_PRECISION_BACKENDS))}")
    for export in exports:
        if export not in MIXED_PRECISION_EXPORTS:
            raise UnsupportedOnTarget(f"export.formats '{export}' cannot hold quantization.format 'auto' (per-layer "
                                      f"formats); use {' and '.join(sorted(MIXED_PRECISION_EXPORTS))}")


def matrix() -> list[dict]:
    """One row per architecture: what it runs natively (for `quantpipe targets`)."""
    return [
        {
            "sm": f"sm_{a.sm}",
            "family": a.family,
            "products": a.products,
            "formats": _supported_on(FORMATS, a.sm),
            "kv_cache": _supported_on(KV_CACHE_FORMATS, a.sm),
            "backends": [b for b in _supported_on(BUILD_BACKENDS, a.sm) if b != "none"],
        }
        for a in ARCHS.values()
    ]


def default_backend(gpus: list[int], fmt: str) -> str:
    """What `build.backend: auto` means: a TensorRT-RTX engine where every target runs one and it can express the
    format (it is built ahead of time on any host), else no engine build."""
    if all(sm in BUILD_BACKENDS["tensorrt-rtx"] for sm in gpus) and fmt in BACKEND_FORMATS["tensorrt-rtx"]:
        return "tensorrt-rtx"
    return "none"
