"""quantize: restore the calibration state onto the model and write it as real low-precision tensors (ModelOpt's
unified checkpoint: packed weights plus scales), with a per-layer report of the weight quantization error."""

from __future__ import annotations

import json

from pipeline.facts import Facts
from pipeline.fmt import human_bytes
from pipeline.stages.base import Stage, StageContext
from pipeline.state import MODEL_STATE

CHECKPOINT = "checkpoint"
LAYERS = "layers.json"


class QuantizeFacts(Facts):
    """The low-precision checkpoint's size and its worst per-layer weight error (layers.json has every layer)."""

    quantized_layers: int
    model_dtype: str  # the dtype the model was quantized in (its stored one unless model.dtype said otherwise)
    checkpoint_bytes: int
    fp16_bytes: int
    size_ratio_fp16: float
    worst_layer_error: float


class Quantize(Stage):
    name = "quantize"
    version = "2"  # 2: the checkpoint is sharded at export.max_shard_size
    inputs = ("load", *MODEL_STATE)
    fields = ("export.dtype", "export.max_shard_size")
    libraries = ("torch", "transformers", "nvidia-modelopt")
    Facts = QuantizeFacts

    def summary(self, facts: QuantizeFacts) -> str:
        return (f"{facts.quantized_layers} layers, weights {human_bytes(facts.checkpoint_bytes)} "
                f"({facts.size_ratio_fp16:.2f}x of fp16); worst layer error {facts.worst_layer_error:.3f}")

    def run(self, ctx: StageContext) -> QuantizeFacts:
        import torch

        from pipeline.quant import export_unified, layer_errors
        from pipeline.state import restore_model

        loaded = ctx.input("load")
        model, _ = restore_model(ctx.inputs)
        model_dtype = str(model.dtype).removeprefix("torch.")  # before export casts it to export.dtype
        errors = layer_errors(model)
        (ctx.out / LAYERS).write_text(json.dumps(errors, indent=2))
        spec = ctx.recipe.export
        export_unified(model, getattr(torch, spec.dtype), ctx.out / CHECKPOINT, spec.max_shard_size)
        weights = sum(p.stat().st_size for p in (ctx.out / CHECKPOINT).glob("*.safetensors"))
        fp16_bytes = loaded.facts.parameters * 2
        return QuantizeFacts(quantized_layers=len(errors), model_dtype=model_dtype, checkpoint_bytes=weights,
                             fp16_bytes=fp16_bytes, size_ratio_fp16=weights / fp16_bytes,
                             worst_layer_error=max((e["relative_error"] for e in errors), default=0.0))
