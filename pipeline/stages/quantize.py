"""quantize: restore the calibration state onto the model and write it as real low-precision tensors (ModelOpt's
unified checkpoint: packed weights plus scales), with a per-layer report of the weight quantization error."""

from __future__ import annotations

import json

from pipeline.fmt import human_bytes
from pipeline.stages.base import Stage, StageContext

CHECKPOINT = "checkpoint"
LAYERS = "layers.json"


class Quantize(Stage):
    name = "quantize"
    version = "2"  # 2: the checkpoint is sharded at export.max_shard_size
    inputs = ("load", "calibrate")
    fields = ("export.dtype", "export.max_shard_size")
    libraries = ("torch", "transformers", "nvidia-modelopt")

    def summary(self, metadata: dict) -> str:
        return (f"{metadata['quantized_layers']} layers, weights {human_bytes(metadata['checkpoint_bytes'])} "
                f"({metadata['size_ratio_fp16']:.2f}x of fp16); worst layer error {metadata['worst_layer_error']:.3f}")

    def run(self, ctx: StageContext) -> dict:
        import torch

        from pipeline.modeling import load_model
        from pipeline.quant import export_unified, layer_errors, restore_calibration

        loaded, calibrated = ctx.input("load"), ctx.input("calibrate")
        model, _ = load_model(loaded / "model")
        restore_calibration(model, calibrated.path)
        model_dtype = str(model.dtype).removeprefix("torch.")  # before export casts it to export.dtype
        errors = layer_errors(model)
        (ctx.out / LAYERS).write_text(json.dumps(errors, indent=2))
        spec = ctx.recipe.export
        export_unified(model, getattr(torch, spec.dtype), ctx.out / CHECKPOINT, spec.max_shard_size)
        weights = sum(p.stat().st_size for p in (ctx.out / CHECKPOINT).glob("*.safetensors"))
        fp16_bytes = loaded.metadata["parameters"] * 2
        return {"quantized_layers": len(errors), "model_dtype": model_dtype, "checkpoint_bytes": weights,
                "fp16_bytes": fp16_bytes, "size_ratio_fp16": weights / fp16_bytes,
                "worst_layer_error": max((e["relative_error"] for e in errors), default=0.0)}
