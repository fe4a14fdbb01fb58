"""NVFP4: E2M1 weights and activations with an FP8 scale per 16 values and an fp32 scale, Blackwell (sm_100+)."""

from pipeline.formats.base import (
    SGLANG,
    TRTLLM,
    VLLM,
    Contract,
    CpuQuantizer,
    QuantFormat,
    WeightCodec,
    blocks,
    thresholds,
)
from pipeline.formats.int4_awq import BLOCK_ALGORITHMS

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_nvfp4(weight, scale, scale_2, in_features: int):
    """Two E2M1 values per byte along the input dimension; an FP8 scale per block and a global fp32 scale."""
    import torch

    lut = torch.tensor(E2M1_VALUES)
    values = torch.stack([lut[(weight & 0x0F).long()], lut[(weight >> 4).long()]], dim=-1)
    return blocks(values.reshape(weight.shape[0], in_features), scale.float() * scale_2.float(), in_features)


def _fake_quant(inputs, quantizer):
    from pipeline import fp4

    return fp4.fake_quant(inputs, quantizer)


# ModelOpt's dynamic block path needs CUDA; this one is its own NVFP4QTensor math in plain torch (pipeline/fp4.py).
NVFP4_CPU = CpuQuantizer("quantpipe_nvfp4_torch", num_bits=(2, 1), scale_bits=(4, 3), fake_quant=_fake_quant)
NVFP4_WEIGHTS = WeightCodec(("uint8",), ("weight_scale", "weight_scale_2", "input_scale"), dequantize_nvfp4)
NVFP4_CONTRACT = Contract(("weight_scale", "weight_scale_2", "input_scale"), ("input_scale", "weight_scale_2"),
                          (TRTLLM, VLLM, SGLANG))

NVFP4 = QuantFormat(
    name="nvfp4",
    modelopt_config="NVFP4_DEFAULT_CFG",
    quant_algo="NVFP4",
    min_sm=100,
    algorithms=BLOCK_ALGORITHMS,
    block_size=16,
    # Measured on SmolLM2-135M with an FP8 KV cache: ppl ratio 1.507, agreement 0.67.
    thresholds=thresholds(ppl_ratio=1.60, gen_agreement=0.55, parity_cosine=0.97),
    layer_tolerance=0.25,
    weights=NVFP4_WEIGHTS,
    contract=NVFP4_CONTRACT,
    gemm_plugin="nvfp4",
    onnx="nvfp4",
    cpu_quantizer=NVFP4_CPU,
    auto_bits=4.5,  # as ModelOpt's NVFP4 config tells AutoQuantize: four bits plus an FP8 scale per 16 values
)
