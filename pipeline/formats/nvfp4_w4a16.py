"""NVFP4 weight-only (W4A16): the NVFP4 weight layout with 16-bit activations, for Blackwell (sm_100+)."""

import dataclasses

from pipeline.formats.base import TRTLLM, Contract, WeightCodec, thresholds
from pipeline.formats.nvfp4 import NVFP4, dequantize_nvfp4

NVFP4_W4A16 = dataclasses.replace(
    NVFP4,
    name="nvfp4_w4a16",
    modelopt_config="W4A16_NVFP4_CFG",
    quant_algo="W4A16_NVFP4",
    algorithms=("max",),
    thresholds=thresholds(ppl_ratio=1.50, gen_agreement=0.55, parity_cosine=0.97),
    weights=WeightCodec(("uint8",), ("weight_scale", "weight_scale_2"), dequantize_nvfp4),
    contract=Contract(("weight_scale", "weight_scale_2"), ("weight_scale_2",), (TRTLLM,)),
    onnx=None,
    refused={"onnx": "the ONNX export emits NVFP4 with FP4 activations only"},
)
