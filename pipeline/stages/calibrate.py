"""calibrate: run ModelOpt calibration (max, AWQ, SmoothQuant, GPTQ) on the recipe's data and store only the
calibration state. ModelOpt calibrates for one format, so the format is part of this stage's key; one calibration
then serves every export (HF, TensorRT-LLM at any tp/pp) and every engine built from it."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from pipeline import data
from pipeline.errors import BadInput
from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)


@contextlib.contextmanager
def layer_progress(track: Callable[..., Iterable], layers: list, batches: int, description: str) -> Iterator[None]:
    """Progress counted in layer forwards, not batches: AWQ's search runs a dozen forwards inside every layer, so
    one batch can take minutes while each layer takes a second."""
    total = len(layers) * batches
    ticks = iter(track(itertools.repeat(None, total), total=total, description=description))
    handles = [layer.register_forward_hook(lambda *_: next(ticks, None)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for _ in ticks:  # ends the bar (a layer some batch skipped, e.g. an idle expert, still counts as done)
            pass


def check_seq_len(seq_len: int, model: dict) -> None:
    limit = model.get("max_position_embeddings")
    if limit and seq_len > limit:
        raise BadInput(f"calibration.seq_len {seq_len} exceeds the model's {limit} positions; lower it")


class Calibrate(Stage):
    name = "calibrate"
    version = "2"  # 2: plan.json and the metadata hold the per-layer formats (format auto)
    inputs = ("load", "sensitivity")  # sensitivity only for format auto
    fields = ("quantization", "calibration")
    libraries = ("torch", "transformers", "nvidia-modelopt")

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.calibration.dataset, store)}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        calib = recipe.calibration
        if data.resolve(calib.dataset).kind == "file":
            data.load_documents(calib.dataset)  # empty or unreadable files fail here, before any work
        check_seq_len(calib.seq_len, model)

    def summary(self, metadata: dict) -> str:
        return (f"{metadata['algorithm']} on {metadata['tokens']} tokens; state {human_bytes(metadata['state_bytes'])}"
                f" ({metadata['state_ratio']:.2%} of the model)")

    def run(self, ctx: StageContext) -> dict:
        import torch

        from pipeline import autoquant
        from pipeline.modeling import load_model
        from pipeline.quant import library_prints, modelopt, plan_quantization, save_calibration, weight_digests

        spec, calib = ctx.recipe.quantization, ctx.recipe.calibration
        loaded = ctx.input("load")
        model, tokenizer = load_model(loaded / "model")
        check_seq_len(calib.seq_len, loaded.metadata)
        windows = data.token_windows(tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
        plan = (autoquant.plan(spec, model, ctx.input("sensitivity").path) if spec.format == "auto"
                else plan_quantization(spec, model))
        batches = list(torch.split(windows, calib.batch_size))
        phases: list[str] = []  # what ModelOpt announced since the last pass ("awq_lite: Searching parameters...")
        passes = 0

        def announce(line: str) -> None:
            if line.endswith("..."):  # ModelOpt's phase lines; others are summaries ("Inserted 756 quantizers")
                phases.append(line.rstrip("."))

        def forward_loop(m) -> None:
            """ModelOpt calls this once per calibration pass (AWQ twice: statistics, then the scale search)."""
            nonlocal passes
            passes += 1
            layers = [module for module in m.modules() if isinstance(module, torch.nn.Linear)]
            phase = phases[-1] if phases else f"{spec.algorithm} calibration"
            phases.clear()
            description = (f"pass {passes}, {phase}: {len(batches)} batches of {calib.batch_size} x "
                           f"{calib.seq_len} tokens through {len(layers)} layers")
            with torch.no_grad(), layer_progress(ctx.track, layers, len(batches), description):
                for batch in batches:
                    m(batch)

        mtq, _ = modelopt()
        before = weight_digests(model)
        started = time.time()
        with library_prints(on_line=announce):
            mtq.quantize(model, plan.config, forward_loop)
        seconds = time.time() - started
        saved = save_calibration(model, loaded / "model" / "model.safetensors", ctx.out, before)
        (ctx.out / "plan.json").write_text(json.dumps(
            {"config": plan.config, "decisions": plan.decisions, "quantized_layers": plan.quantized_layers,
             "excluded_layers": plan.excluded_layers, "layer_formats": plan.layer_formats}, indent=2, default=str))
        model_bytes = loaded.metadata["weights_bytes"]
        return {"format": spec.format, "algorithm": spec.algorithm, "kv_cache": spec.kv_cache,
                "block_size": plan.block_size, "decisions": plan.decisions,
                "quantized_layers": len(plan.quantized_layers), "excluded_layers": len(plan.excluded_layers),
                "layer_formats": plan.layer_formats,
                "tokens": int(windows.numel()), "calibration_seconds": round(seconds, 2),
                "state_tensors": saved["tensors"], "rescaled_weights": saved["rescaled_weights"],
                "state_bytes": saved["bytes"],
                "state_ratio": saved["bytes"] / model_bytes}
