"""INT4 AWQ: 4-bit weights in blocks of 128 (or 64), 16-bit activations, Ampere (sm_80) and newer."""

from pipeline.formats.base import TRTLLM, Contract, QuantFormat, WeightCodec, blocks, thresholds

BLOCK_ALGORITHMS = ("max", "awq_lite", "awq_clip", "awq_full", "gptq")


def dequantize_int4(weight, scale, scale_2, in_features: int):
    """Two signed 4-bit values per byte, packed along the output dimension (low nibble first), one fp32 scale per
    block of the input dimension."""
    import torch

    packed = weight.view(torch.uint8)
    values = torch.stack([(packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)], dim=1)
    values = values.reshape(-1, in_features).float()
    values = torch.where(values > 7, values - 16, values)  # two's complement nibbles
    return blocks(values, scale.float(), in_features)


INT4_AWQ = QuantFormat(
    name="int4_awq",
    modelopt_config="INT4_AWQ_CFG",
    quant_algo="W4A16_AWQ",
    min_sm=80,
    default_algorithm="awq_lite",
    algorithms=BLOCK_ALGORITHMS,
    block_size=128,
    block_size_fixed=False,
    block_fallbacks=(128, 64),  # what TensorRT-LLM's INT4 kernels take
    # Measured on SmolLM2-135M: ppl ratio 1.201, agreement 0.70 (a 135M model is far more sensitive to 4 bits).
    thresholds=thresholds(ppl_ratio=1.25, gen_agreement=0.60, parity_cosine=0.95),
    layer_tolerance=0.5,
    weights=WeightCodec(("uint8", "int8"), ("weight_scale",), dequantize_int4),
    contract=Contract(("weight_scale",), ("pre_quant_scale",), (TRTLLM,), pre_quant=True),
    onnx="int4",
)
