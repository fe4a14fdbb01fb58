"""What a quantization format is, as data: one frozen `QuantFormat` per format (one file each in this package).

Everything the pipeline needs to know about a format lives on it: which ModelOpt config and algorithms make it, where
it runs natively, the verify thresholds, what its export looks like (quant_algo, tensors, how to dequantize them),
how TensorRT-LLM and ONNX take it, and why a layout or backend cannot take it. Nothing heavy is imported here:
torch is imported inside the functions that need it, so `plan`, `status` and `--help` stay instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# The serving engines whose ModelOpt loaders read an HF checkpoint (pipeline/contracts.py checks their contracts).
TRTLLM, VLLM, SGLANG = "TensorRT-LLM", "vLLM", "SGLang"
# Verify metrics a format sets a default threshold for: name -> the direction the threshold bounds.
METRICS = {"ppl_ratio": "max", "gen_agreement": "min", "parity_cosine": "min"}
ALL_KV_CACHES = ("none", "fp8", "nvfp4")


@dataclass(frozen=True)
class Contract:
    """What the serving engines' ModelOpt loaders require of each quantized linear layer in an HF checkpoint."""

    tensors: tuple[str, ...]  # what every quantized linear carries beside its weight
    identical: tuple[str, ...]  # scales a fused q/k/v or gate/up layer must share
    engines: tuple[str, ...]  # the engines whose ModelOpt loader reads this quant_algo
    pre_quant: bool = False  # AWQ / SmoothQuant: pre_quant_scale wherever no norm could absorb it


@dataclass(frozen=True)
class WeightCodec:
    """How an exported quantized weight looks and how it is dequantized by hand. `dequantize(weight, scale,
    scale_2, in_features)` returns float32 [out, in]; dtypes are torch dtype names (nothing imported here)."""

    dtypes: tuple[str, ...]  # the quantized weight's dtypes (packed int4 is uint8 in HF, int8 in TensorRT-LLM)
    companions: tuple[str, ...]  # HF suffixes every quantized weight needs (weight_scale, input_scale, ...)
    dequantize: Callable


@dataclass(frozen=True)
class CpuQuantizer:
    """A pure-torch fake quantizer ModelOpt runs (through `register_quant_backend`) where its own path needs CUDA.
    It replaces every quantizer entry with these value and scale bits, whichever format or KV cache asked for it."""

    backend: str  # the name registered with ModelOpt; calibration states store it, so it never changes
    num_bits: tuple[int, int]
    scale_bits: tuple[int, int]
    fake_quant: Callable  # (inputs, quantizer) -> fake-quantized inputs


@dataclass(frozen=True)
class QuantFormat:
    name: str  # quantization.format, as ModelOpt spells it
    modelopt_config: str  # the mtq config it starts from
    quant_algo: str  # what ModelOpt's exporters write (hf_quant_config.json, TensorRT-LLM config.json)
    min_sm: int  # the oldest architecture that runs it natively (targets.py lists the architectures)
    thresholds: Mapping[str, float]  # default verify threshold per metric name (METRICS)
    layer_tolerance: float  # relative error allowed between an export's dequantized layer and the calibrated one
    weights: WeightCodec
    contract: Contract
    default_algorithm: str = "max"  # what algorithm "auto" means: ModelOpt's default for the format
    algorithms: tuple[str, ...] = ("max",)  # the algorithms that make sense for it
    block_size: int | None = None  # weight block (group) size; None = per-channel or per-tensor scales
    block_size_fixed: bool = True  # the scale layout fixes the block size (the recipe may not change it)
    block_fallbacks: tuple[int, ...] = ()  # smaller block sizes its kernels take, largest first
    kv_caches: tuple[str, ...] = ALL_KV_CACHES  # quantization.kv_cache values it combines with
    gemm_plugin: str = "auto"  # trtllm-build --gemm_plugin
    onnx: str | None = None  # the Q/DQ kind its ONNX is emitted as (onnx_export.EMITTERS), None: no ONNX
    cpu_quantizer: CpuQuantizer | None = None  # where ModelOpt's fake quantization needs CUDA
    auto_bits: float | None = None  # bits per weight AutoQuantize counts for it as a candidate; None: not one
    refused: Mapping[str, str] = field(default_factory=dict)  # export layout or build backend -> why it cannot

    def __post_init__(self) -> None:
        if set(self.thresholds) != set(METRICS):
            raise ValueError(f"format {self.name}: thresholds must name exactly {', '.join(METRICS)}")
        if self.onnx is None and "onnx" not in self.refused:
            raise ValueError(f"format {self.name}: no ONNX emitter, so refused['onnx'] must say why")

    def refusal(self, what: str) -> str | None:
        """Why an export layout (hf, trtllm, onnx) or a build backend cannot take this format (None: it can)."""
        return self.refused.get(what)


def thresholds(ppl_ratio: float, gen_agreement: float, parity_cosine: float) -> dict[str, float]:
    return {"ppl_ratio": ppl_ratio, "gen_agreement": gen_agreement, "parity_cosine": parity_cosine}


def per_tensor(weight, scale, scale_2, in_features: int):
    """FP8 weight times one fp32 scale."""
    return weight.float() * scale.float()


def per_channel(weight, scale, scale_2, in_features: int):
    """INT8 weight times one fp32 scale per output row."""
    return weight.float() * scale.float().reshape(-1, 1)


def blocks(values, scale, in_features: int):
    """float [out, in] values times one scale per block of the input dimension ([out, in / block])."""
    return values * scale.repeat_interleave(in_features // scale.shape[-1], dim=-1)
