"""W4A8 AWQ: INT4 weights in blocks with FP8 activations, Ada (sm_89) and newer. INT4 AWQ's weights and blocks, plus
FP8 activation scales."""

from dataclasses import replace

from pipeline.formats.base import TRTLLM, Contract, WeightCodec, thresholds
from pipeline.formats.int4_awq import INT4_AWQ, dequantize_int4

W4A8_AWQ = replace(
    INT4_AWQ,
    name="w4a8_awq",
    modelopt_config="W4A8_AWQ_BETA_CFG",
    quant_algo="W4A8_AWQ",
    min_sm=89,
    thresholds=thresholds(ppl_ratio=1.30, gen_agreement=0.55, parity_cosine=0.95),
    weights=WeightCodec(("uint8", "int8"), ("weight_scale", "weight_scale_2", "input_scale"), dequantize_int4),
    contract=Contract(("weight_scale", "weight_scale_2", "input_scale"),
                      ("input_scale", "weight_scale_2", "pre_quant_scale"), (TRTLLM,), pre_quant=True),
    refused={"tensorrt-rtx": "TensorRT-RTX has no W4A8 path in ONNX Q/DQ form"},
)
