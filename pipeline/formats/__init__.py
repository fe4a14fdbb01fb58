"""The format registry: every quantization format, one module each. Adding a format is a new module here and one
line below; recipe, targets, quant, dequant, onnx_export, verify and the backends read it from this registry."""

from __future__ import annotations

from pipeline.formats.auto import AUTO
from pipeline.formats.base import CpuQuantizer, QuantFormat
from pipeline.formats.fp8 import FP8
from pipeline.formats.int4_awq import INT4_AWQ
from pipeline.formats.int8_sq import INT8_SQ
from pipeline.formats.kv_cache import KV_CACHES
from pipeline.formats.mxfp8 import MXFP8
from pipeline.formats.nvfp4 import NVFP4
from pipeline.formats.nvfp4_awq import NVFP4_AWQ
from pipeline.formats.nvfp4_w4a16 import NVFP4_W4A16
from pipeline.formats.w4a8_awq import W4A8_AWQ

FORMATS: dict[str, QuantFormat] = {f.name: f for f in (FP8, INT8_SQ, INT4_AWQ, W4A8_AWQ, NVFP4, NVFP4_AWQ, MXFP8,
                                                       NVFP4_W4A16, AUTO)}

__all__ = ["FORMATS", "KV_CACHES", "QuantFormat", "by_quant_algo", "cpu_quantizers", "get"]


def get(name: str) -> QuantFormat:
    return FORMATS[name]


def by_quant_algo(quant_algo: str | None) -> QuantFormat | None:
    """The format an exported checkpoint's quant_algo names (formats that share a layout share its codec)."""
    return next((f for f in FORMATS.values() if f.quant_algo == quant_algo), None)


def cpu_quantizers() -> list[CpuQuantizer]:
    """Every CPU fake quantizer a format declares, once each."""
    return list({f.cpu_quantizer.backend: f.cpu_quantizer for f in FORMATS.values() if f.cpu_quantizer}.values())
