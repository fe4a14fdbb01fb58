"""quantize: restore the calibration state onto the model and write it as real low-precision tensors (ModelOpt's
unified checkpoint: packed weights plus scales), with a per-layer report of the weight quantization error."""

from __future__ import annotations

import json

from pipeline.fmt import human_bytes
from pipeline.stages.base import Stage, StageContext
from pipeline.state import MODEL_STATE

CHECKPOINT = "checkpoint"
LAYERS = "layers.json"


class Quantize(Stage):
    name = "quantize"
    version = "1"
    inputs = ("load", *MODEL_STATE)
    fields = ("export.dtype",)
    libraries = ("torch", "transformers", "nvidia-modelopt")

    def summary(self, metadata: dict) -> str:
        return (f"{metadata['quantized_layers']} layers, weights {human_bytes(metadata['checkpoint_bytes'])} "
                f"({metadata['size_ratio_fp16']:.2f}x of fp16); worst layer error {metadata['worst_layer_error']:.3f}")

    def run(self, ctx: StageContext) -> dict:
        import torch

        from pipeline.quant import export_unified, layer_errors
        from pipeline.state import restore_model

        loaded = ctx.input("load")
        model, _ = restore_model(ctx.inputs)
        errors = layer_errors(model)
        (ctx.out / LAYERS).write_text(json.dumps(errors, indent=2))
        export_unified(model, getattr(torch, ctx.recipe.export.dtype), ctx.out / CHECKPOINT)
        weights = sum(p.stat().st_size for p in (ctx.out / CHECKPOINT).glob("*.safetensors"))
        fp16_bytes = loaded.metadata["parameters"] * 2
        return {"quantized_layers": len(errors), "checkpoint_bytes": weights, "fp16_bytes": fp16_bytes,
                "size_ratio_fp16": weights / fp16_bytes,
                "worst_layer_error": max((e["relative_error"] for e in errors), default=0.0)}
