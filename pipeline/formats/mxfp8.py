"""MXFP8 (OCP microscaling): FP8 E4M3 weights and activations with a power-of-two (E8M0) scale per 32 values,
Blackwell (sm_100+). Dynamic scales: nothing to calibrate beyond ModelOpt's max pass."""

from pipeline.formats.base import TRTLLM, Contract, CpuQuantizer, QuantFormat, WeightCodec, blocks, thresholds


def dequantize_mxfp8(weight, scale, scale_2, in_features: int):
    """FP8 values times 2^(e - 127), one biased E8M0 exponent (uint8) per 32 values of the input dimension."""
    import torch

    return blocks(weight.float(), torch.exp2(scale.float() - 127), in_features)


def fake_quant(inputs, quantizer):
    """MXFP8 fake quantization in plain torch with ModelOpt's own MXFP8QTensor math (its built-in path needs a
    CUDA extension)."""
    from modelopt.torch.quantization.qtensor import MXFP8QTensor

    packed, scale = MXFP8QTensor.quantize(inputs)
    return packed.dequantize(dtype=inputs.dtype, scale=scale).reshape(inputs.shape)


MXFP8 = QuantFormat(
    name="mxfp8",
    modelopt_config="MXFP8_DEFAULT_CFG",
    quant_algo="MXFP8",
    min_sm=100,
    block_size=32,
    # Measured on SmolLM2-135M with the test settings (4 x 64 calibration tokens, 256 held-out): ppl ratio 1.088,
    # agreement 0.94, dequantized HF export vs calibrated model cosine 0.9998 (E8M0 scales round up to a power of 2).
    thresholds=thresholds(ppl_ratio=1.15, gen_agreement=0.80, parity_cosine=0.995),
    layer_tolerance=0.1,
    weights=WeightCodec(("float8_e4m3fn",), ("weight_scale",), dequantize_mxfp8),
    contract=Contract(("weight_scale",), (), (TRTLLM,)),
    cpu_quantizer=CpuQuantizer("quantpipe_mxfp8_torch", num_bits=(4, 3), scale_bits=(8, 0), fake_quant=fake_quant),
    refused={"onnx": "the ONNX export has no MXFP8 path on this host (ModelOpt's MXFP8 tracing needs its CUDA "
                     "extension)"},
)
