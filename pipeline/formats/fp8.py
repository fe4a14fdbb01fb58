"""FP8 (E4M3) weights and activations, per-tensor scales: Ada (sm_89) and newer."""

from pipeline.formats.base import SGLANG, TRTLLM, VLLM, Contract, QuantFormat, WeightCodec, per_tensor, thresholds

FP8 = QuantFormat(
    name="fp8",
    modelopt_config="FP8_DEFAULT_CFG",
    quant_algo="FP8",
    min_sm=89,
    algorithms=("max", "smoothquant"),
    # Measured on SmolLM2-135M (32 x 256 calibration tokens, 2048 held-out): ppl ratio 1.019, agreement 0.90.
    thresholds=thresholds(ppl_ratio=1.05, gen_agreement=0.80, parity_cosine=0.995),
    layer_tolerance=0.1,
    weights=WeightCodec(("float8_e4m3fn",), ("weight_scale", "input_scale"), per_tensor),
    # FP8 weight scales may differ across q/k/v: the loaders requantize the fused weight to their maximum.
    contract=Contract(("weight_scale", "input_scale"), ("input_scale",), (TRTLLM, VLLM, SGLANG)),
    gemm_plugin="fp8",
    onnx="fp8",
    auto_bits=8.0,
)
