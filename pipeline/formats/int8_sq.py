"""INT8 SmoothQuant: int8 weights (per-channel scales) and activations, Ampere (sm_80) and newer."""

from pipeline.formats.base import TRTLLM, Contract, QuantFormat, WeightCodec, per_channel, thresholds

INT8_SQ = QuantFormat(
    name="int8_sq",
    modelopt_config="INT8_SMOOTHQUANT_CFG",
    quant_algo="W8A8_SQ_PER_CHANNEL",
    min_sm=80,
    default_algorithm="smoothquant",
    algorithms=("max", "smoothquant"),
    thresholds=thresholds(ppl_ratio=1.10, gen_agreement=0.65, parity_cosine=0.995),
    layer_tolerance=0.1,
    weights=WeightCodec(("int8",), ("weight_scale", "input_scale"), per_channel),
    contract=Contract(("weight_scale", "input_scale"), ("input_scale", "pre_quant_scale"), (TRTLLM,),
                      pre_quant=True),
    onnx="int8",
)
