"""ONNX Runtime's own quantizers applied to the unquantized ONNX export of the load artifact (the pipeline's decoder
graph with KV cache, traced in fp32): dynamic INT8 (`quantize_dynamic`, the library's defaults) and 4-bit
weight-only MatMulNBits (`MatMulNBitsQuantizer`, round to nearest), both run by onnxruntime on this CPU."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

from pipeline.compare.stages import REFERENCE, Baseline
from pipeline.stages.base import Stage, StageContext

ONNX_FILE = "model.onnx"


class UnquantizedOnnx(Stage):
    """The load artifact traced as the pipeline's decoder graph, without quantization: what ORT's quantizers take."""

    name = "compare-onnx"
    version = "1"
    inputs = ("load",)
    libraries = ("torch", "transformers", "onnx")

    def run(self, ctx: StageContext) -> dict:
        import torch

        from pipeline import onnx_export
        from pipeline.modeling import load_model

        model, _ = load_model(ctx.input("load") / "model")
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape logic
            torch.onnx.export(onnx_export.Decoder(model).eval(), onnx_export._example(model.config),
                              str(ctx.out / ONNX_FILE), input_names=onnx_export.INPUTS,
                              output_names=onnx_export.OUTPUTS, dynamic_axes=onnx_export.DYNAMIC_AXES,
                              opset_version=19, do_constant_folding=True, dynamo=False)
        return {"bytes": _bytes(ctx.out)}


class OnnxRuntime(Baseline):
    inputs = ("load", REFERENCE, UnquantizedOnnx.name)
    upstream = (UnquantizedOnnx(),)
    library = "onnxruntime"
    modules = ("onnxruntime", "onnx")
    extra = "rtx"

    def quantize(self, ctx: StageContext):
        import numpy as np
        import torch
        from transformers import AutoConfig

        from pipeline.compare import measure
        from pipeline.onnx_export import OrtDecoder, kv_shape

        self.quantize_onnx(ctx.input(UnquantizedOnnx.name) / ONNX_FILE, ctx.out / ONNX_FILE)
        config = AutoConfig.from_pretrained(ctx.input("load") / "model")
        decoder = OrtDecoder(ctx.out / ONNX_FILE)
        empty = np.zeros(kv_shape(config, 1, 0), np.float32)

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(decoder(ids.numpy(), np.ones(ids.shape), empty, empty)[0])

        return measure.Candidate(measure.logits_of(logits), _bytes(ctx.out), "onnxruntime CPU",
                                 lambda prompt, steps: decoder.prefill_then_decode(config, prompt[0].numpy(), steps))

    def quantize_onnx(self, source: Path, target: Path) -> None:
        raise NotImplementedError


class OrtInt8(OnnxRuntime):
    name = "compare-ort-int8"
    title = "ONNX Runtime dynamic INT8"
    settings: ClassVar[dict] = {"weight_type": "QInt8", "per_channel": False}

    def quantize_onnx(self, source: Path, target: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, weight_type=getattr(QuantType, self.settings["weight_type"]),
                         per_channel=self.settings["per_channel"])


class OrtInt4(OnnxRuntime):
    name = "compare-ort-int4"
    title = "ONNX Runtime 4-bit MatMulNBits"
    settings: ClassVar[dict] = {"bits": 4, "block_size": 128, "is_symmetric": True}

    def quantize_onnx(self, source: Path, target: Path) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(str(source), **self.settings)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob(f"{ONNX_FILE}*"))
