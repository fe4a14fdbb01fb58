"""The comparison's rows as pipeline stages, so the runner keys, locks, caches and records them like any other:
the unquantized reference, a recipe's own calibrated model, and the base of every library baseline."""

from __future__ import annotations

import time
from typing import ClassVar

from pipeline import data
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.reference import EVAL_FIELDS  # what every row is measured on (thresholds play no part)
from pipeline.store import ArtifactStore

REFERENCE = "compare-reference"


class Row(Stage):
    """A stage whose artifact is one row of the comparison: its measurements are the manifest's metadata."""

    version = "1"
    fields = EVAL_FIELDS
    libraries = ("torch", "transformers")

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.verify.dataset, store)}

    def summary(self, metadata: dict) -> str:
        ratio = f"ppl ratio {metadata['ppl_ratio']:.3f}, " if "ppl_ratio" in metadata else ""
        return f"{ratio}ppl {metadata['ppl']:.2f}, {metadata['size_vs_fp16']:.2f}x of fp16"


class Reference(Row):
    """The unquantized model: perplexity, its greedy continuations of the prompts (what agreement is measured
    against), and its decoding speed in PyTorch fp32."""

    name = REFERENCE
    inputs = ("load",)

    def run(self, ctx: StageContext) -> dict:
        from pipeline.compare import measure
        from pipeline.modeling import load_model
        from pipeline.verify import evaluate

        loaded = ctx.input("load")
        model, tokenizer = load_model(loaded / "model")
        held = measure.heldout(ctx.recipe, tokenizer)
        fp16 = fp16_bytes(loaded.metadata)
        candidate = measure.Candidate(model, fp16, "PyTorch fp32", measure.torch_decode(model, tokenizer))
        result = measure.measure(candidate, held, None, fp16)
        return {**result, "size_vs_fp16": 1.0, "weight_bytes": fp16, "quantize_seconds": None,
                "generations": evaluate.generate(model, tokenizer, held.prompts, held.max_new_tokens)}


class RecipeRow(Row):
    """A recipe's calibrated model (ModelOpt fake quantization in PyTorch) against the reference; its size is the
    quantize stage's real checkpoint. It deploys through TensorRT, so no CPU speed is claimed for it."""

    name = "compare-recipe"
    inputs = ("load", "calibrate", "quantize", REFERENCE)
    libraries = ("torch", "transformers", "nvidia-modelopt")

    def run(self, ctx: StageContext) -> dict:
        from pipeline.compare import measure
        from pipeline.modeling import load_model
        from pipeline.quant import restore_calibration

        loaded, calibrated, quantized = ctx.input("load"), ctx.input("calibrate"), ctx.input("quantize")
        model, tokenizer = load_model(loaded / "model")
        restore_calibration(model, calibrated.path)
        candidate = measure.Candidate(model, quantized.metadata["checkpoint_bytes"],
                                      "PyTorch, ModelOpt fake quantization", None)
        result = measure.measure(candidate, measure.heldout(ctx.recipe, tokenizer), ctx.input(REFERENCE).metadata,
                                 fp16_bytes(loaded.metadata))
        # Time to quantize: calibration plus writing the real low-precision checkpoint, as each was built.
        seconds = calibrated.manifest["seconds"] + quantized.manifest["seconds"]
        return {**result, "quantize_seconds": round(seconds, 2)}


class Baseline(Row):
    """Another library's quantization of the load artifact, run by that library. Subclasses name the library
    (`library`, its import `modules`, the pyproject `extra` that installs them) and implement `quantize`."""

    inputs = ("load", REFERENCE)
    upstream: tuple[Stage, ...] = ()  # stages of its own it reads besides load and the reference
    title: str
    library: str
    modules: tuple[str, ...]
    extra: str
    settings: ClassVar[dict]

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "settings": self.settings}

    def environment(self, recipe: Recipe) -> dict:
        from pipeline import host

        return host.versions((*self.libraries, self.library))

    def quantize(self, ctx: StageContext):
        """The quantized model as a measure.Candidate; files worth keeping go under ctx.out."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> dict:
        from transformers import AutoTokenizer

        from pipeline.compare import measure

        loaded = ctx.input("load")
        started = time.perf_counter()
        candidate = self.quantize(ctx)
        seconds = time.perf_counter() - started
        tokenizer = AutoTokenizer.from_pretrained(loaded / "model")
        result = measure.measure(candidate, measure.heldout(ctx.recipe, tokenizer), ctx.input(REFERENCE).metadata,
                                 fp16_bytes(loaded.metadata))
        return {**result, "quantize_seconds": round(seconds, 2), "settings": self.settings}


def fp16_bytes(load_metadata: dict) -> int:
    """The model's weights in fp16, the size every row is compared with (as the quantize stage does)."""
    return load_metadata["parameters"] * 2
