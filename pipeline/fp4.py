"""NVFP4 on CPU: the fake quantizer ModelOpt runs through `register_quant_backend` (its built-in dynamic block path
needs CUDA), built on ModelOpt's own NVFP4QTensor math, and the autograd functions that emit ModelOpt's FP4 ONNX ops
while tracing. formats/nvfp4.py declares the backend, quant registers it; onnx_export traces through it."""

from __future__ import annotations

import torch


def fake_quant(inputs, quantizer):
    """NVFP4 fake quantization in plain torch, for CPUs: ModelOpt's own NVFP4QTensor quantize/dequantize math
    (E2M1 values, FP8 E4M3 scale per 16-element block, fp32 scale from the tensor's amax). ModelOpt's built-in path
    for dynamic block quantization needs a CUDA kernel. While tracing to ONNX it emits ModelOpt's FP4 ops."""
    block = quantizer.block_sizes[-1]
    amax = quantizer.amax if quantizer.amax is not None else inputs.abs().amax()
    if torch.onnx.is_in_onnx_export():
        static = getattr(quantizer, "_onnx_quantizer_type", None) == "static"
        return (Fp4WeightOnnx if static else Fp4Onnx).apply(inputs, block, float(amax))
    return Fp4StraightThrough.apply(inputs, block, amax)


def nvfp4_qdq(inputs, block: int, amax):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    scale_2 = torch.as_tensor(amax).float().reshape(()) / (6.0 * 448.0)
    packed, scale, scale_2 = NVFP4QTensor.quantize(inputs, block, weights_scaling_factor_2=scale_2)
    output = packed.dequantize(dtype=inputs.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: block})
    return output.reshape(inputs.shape)


class Fp4StraightThrough(torch.autograd.Function):
    """NVFP4 quantize-dequantize whose gradient passes straight through (the rounding has none), so quantization-
    aware fine-tuning trains through the CPU backend. The forward is exactly nvfp4_qdq's."""

    @staticmethod
    def forward(ctx, inputs, block, amax):
        return nvfp4_qdq(inputs, block, amax)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _fp4_forward(ctx, inputs, block, amax):
    # The math must not be traced itself: the symbolic below stands for it, and traced internals would leave the
    # output mapped to an intermediate value, which breaks the next traced op that reads it.
    tracing = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return nvfp4_qdq(inputs, block, amax)
    finally:
        torch._C._set_tracing_state(tracing)


def _fp4_symbolic(onnx_type: str):
    def symbolic(g, inputs, block, amax):
        from modelopt.torch.quantization.export_onnx import export_fp4

        amax_value = g.op("Constant", value_t=torch.tensor(amax, dtype=torch.float32))
        output = export_fp4(g, inputs, block, amax_value, (2, 1), "Float", onnx_type)
        output.setType(inputs.type())  # later symbolics read the dtype of what feeds them
        return output

    return staticmethod(symbolic)


class Fp4Onnx(torch.autograd.Function):
    """NVFP4 activations while tracing to ONNX: computed on CPU like the backend, emitted as ModelOpt's
    TRT_FP4DynamicQuantize + DequantizeLinear (ModelOpt's built-in path would need CUDA for the traced forward).
    The tracer takes neither string arguments nor inherited symbolics, hence two sibling classes."""

    forward = staticmethod(_fp4_forward)
    symbolic = _fp4_symbolic("dynamic")


class Fp4WeightOnnx(torch.autograd.Function):
    """NVFP4 weights while tracing: TRT_FP4QDQ, which ModelOpt's NVFP4 exporter turns into FP4 initializers."""

    forward = staticmethod(_fp4_forward)
    symbolic = _fp4_symbolic("static")
