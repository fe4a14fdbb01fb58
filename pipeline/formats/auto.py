"""Format auto: a format per layer chosen by ModelOpt's AutoQuantize among candidate formats under an effective-bits
budget (pipeline/autoquant.py), exported as quant_algo MIXED_PRECISION with each layer's own quant_algo. Where it runs
is where all its candidates run (the target check asks each candidate); these fields describe the whole map."""

from pipeline.formats.base import TRTLLM, Contract, QuantFormat, WeightCodec, thresholds

AUTO = QuantFormat(
    name="auto",
    modelopt_config="",  # none: pipeline/autoquant.py builds the search from the candidates' own configs
    quant_algo="MIXED_PRECISION",
    min_sm=89,  # the oldest a candidate runs on (fp8); the target check also asks every candidate
    algorithms=("max",),  # AutoQuantize calibrates every candidate with max (no AWQ or SmoothQuant search)
    # As loose as its loosest candidate (nvfp4): the budget decides the real quality.
    thresholds=thresholds(ppl_ratio=1.60, gen_agreement=0.55, parity_cosine=0.97),
    layer_tolerance=0.25,
    weights=WeightCodec((), (), None),  # each layer is dequantized with its own quant_algo's codec
    # TensorRT-LLM's QuantConfig reads quantized_layers; the other loaders take one quant_algo per checkpoint.
    contract=Contract((), (), (TRTLLM,)),
    kv_caches=("none",),
    refused={"onnx": "the ONNX decoder takes one Q/DQ format, not a per-layer map"},
)
