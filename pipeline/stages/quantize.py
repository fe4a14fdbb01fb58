"""quantize: restore the calibration state onto the model and write it as real low-precision tensors (ModelOpt's
unified checkpoint: packed weights plus scales), with a per-layer report of the weight quantization error."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time

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

        from pipeline.quant import check_architectures, export_unified, layer_errors
        from pipeline.state import restore_placed

        loaded = ctx.input("load")
        scratch = ctx.out.parent / f".offload-{ctx.out.name}"  # beside the work folder, never part of the artifact
        try:
            model, _, placed = restore_placed(ctx, scratch)
            check_architectures(model)  # before the per-layer errors, which read every weight
            model_dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")  # before export's cast
            errors = layer_errors(model)
            (ctx.out / LAYERS).write_text(json.dumps(errors, indent=2))
            spec = ctx.recipe.export
            export_unified(model, getattr(torch, spec.dtype), ctx.out / CHECKPOINT, spec.max_shard_size,
                           on_layer=LayerWritten(ctx) if placed.spills else None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        weights = sum(p.stat().st_size for p in (ctx.out / CHECKPOINT).glob("*.safetensors"))
        fp16_bytes = loaded.facts.parameters * 2
        return QuantizeFacts(quantized_layers=len(errors), model_dtype=model_dtype, checkpoint_bytes=weights,
                             fp16_bytes=fp16_bytes, size_ratio_fp16=weights / fp16_bytes,
                             worst_layer_error=max((e["relative_error"] for e in errors), default=0.0))


class LayerWritten:
    """A progress event per decoder layer the streaming export has written, with elapsed time and time left."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx, self.started = ctx, time.time()
        self.stdout = sys.stdout  # ModelOpt's prints are routed to the log while it exports; events are not

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.time() - self.started
        remaining = elapsed / done * (total - done)
        with contextlib.redirect_stdout(self.stdout):
            self._report(done, total, elapsed, remaining)

    def _report(self, done: int, total: int, elapsed: float, remaining: float) -> None:
        self.ctx.report({"layer": done, "layers": total, "elapsed_s": round(elapsed, 2),
                         "remaining_s": round(remaining, 2),
                         "message": f"layer {done}/{total} exported, {elapsed:.0f} s elapsed, about "
                                    f"{remaining:.0f} s left"})
