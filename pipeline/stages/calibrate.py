"""calibrate: run ModelOpt calibration (max, AWQ, SmoothQuant, GPTQ) on the recipe's data and store only the
calibration state. ModelOpt calibrates for one format, so the format is part of this stage's key; one calibration
then serves every export (HF, TensorRT-LLM at any tp/pp) and every engine built from it."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pipeline import data, placement
from pipeline.errors import BadInput
from pipeline.facts import Facts
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


class LayerProgress:
    """One tick per finished decoder layer: a bar (elapsed, time left) and a progress event for schedulers.
    Made before ModelOpt's prints are routed to the log, it sends its events to the stdout of that time."""

    def __init__(self, ctx: StageContext, layers: int, start: int) -> None:
        self.ctx, self.layers, self.start, self.done = ctx, layers, start, start
        self.stdout = sys.stdout
        self.started = time.time()
        description = f"layer-by-layer calibration: {layers} layers" + (f", resumed at {start}" if start else "")
        self.ticks = iter(ctx.track(itertools.repeat(None, layers - start), total=layers - start,
                                    description=description))

    def finished(self, index: int) -> None:
        next(self.ticks, None)
        self.done += 1
        elapsed = time.time() - self.started
        remaining = elapsed / (self.done - self.start) * (self.layers - self.done)
        with contextlib.redirect_stdout(self.stdout):
            self.ctx.report({"layer": index + 1, "layers": self.layers, "resumed_at": self.start,
                             "elapsed_s": round(elapsed, 2), "remaining_s": round(remaining, 2),
                             "message": f"layer {index + 1}/{self.layers} calibrated, {elapsed:.0f} s elapsed, "
                                        f"about {remaining:.0f} s left"})

    def close(self) -> None:
        for _ in self.ticks:  # ends the bar
            pass


def offload_folder(ctx: StageContext) -> Path:
    """Where weights that fit in no memory go: a folder per key in the recipe's offload_dir (runs may share it),
    else the scratch area."""
    own = ctx.recipe.model.offload_dir
    return Path(own).expanduser() / ctx.scratch.name if own else ctx.scratch / "offload"


def check_seq_len(seq_len: int, model: dict) -> None:
    limit = model.get("max_position_embeddings")
    if limit and seq_len > limit:
        raise BadInput(f"calibration.seq_len {seq_len} exceeds the model's {limit} positions; lower it")


class CalibrationFacts(Facts):
    """What was calibrated for which format, the decisions that made the format fit, and how big the state is."""

    format: str
    algorithm: str
    kv_cache: str
    model_dtype: str  # what it was calibrated in: the stored dtype unless model.dtype said otherwise
    block_size: int | None
    decisions: list[str]
    quantized_layers: int
    excluded_layers: int
    layer_formats: dict[str, str]  # format auto: linear layer -> the format AutoQuantize chose ({} otherwise)
    tokens: int
    calibration_seconds: float
    placement: dict  # placement.Placement.to_json(): where the layers sat
    layerwise: bool
    resumed_at_layer: int | None  # the layer a resumed layer-by-layer run started at
    state_tensors: int
    rescaled_weights: int
    state_bytes: int
    state_ratio: float  # of the loaded model's weights


class Calibrate(Stage):
    name = "calibrate"
    # 2: placement (device kind in the key) and layer-by-layer calibration; 3: calibrates in the stored dtype
    # (bf16 models were upcast to fp32 before) and computes only the logits a quantized output layer needs; 4: the
    # per-layer formats (format auto) in plan.json and the facts
    version = "4"
    inputs = ("load", "sensitivity")  # sensitivity only for format auto
    fields = ("quantization", "calibration")
    libraries = ("torch", "transformers", "nvidia-modelopt")
    Facts = CalibrationFacts

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.calibration.dataset, store)}

    def environment(self, recipe: Recipe) -> dict:
        """CUDA and CPU kernels round differently, so calibrations made on each are not interchangeable: the device
        kind is part of the key (where the weights sit, GPU, CPU memory or disk, is not: the math runs on it)."""
        return {**super().environment(recipe), "device": placement.device_kind(recipe.model)}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        placement.check(recipe.model, model.get("weights_bytes"))
        calib = recipe.calibration
        if data.resolve(calib.dataset).kind == "file":
            data.load_documents(calib.dataset)  # empty or unreadable files fail here, before any work
        check_seq_len(calib.seq_len, model)

    def summary(self, facts: CalibrationFacts) -> str:
        resumed = facts.resumed_at_layer
        how = f", layer by layer{f' (resumed at layer {resumed + 1})' if resumed else ''}" if facts.layerwise else ""
        return (f"{facts.algorithm} on {facts.tokens} tokens{how}; state {human_bytes(facts.state_bytes)}"
                f" ({facts.state_ratio:.2%} of the model)")

    def run(self, ctx: StageContext) -> CalibrationFacts:
        import torch

        from pipeline import autoquant, layerwise
        from pipeline.modeling import load_model
        from pipeline.quant import plan_quantization, save_calibration, weight_digests

        spec, calib = ctx.recipe.quantization, ctx.recipe.calibration
        loaded = ctx.input("load")
        placed = placement.plan(loaded / "model", ctx.recipe.model)
        ctx.report({"placement": placed.to_json(), "message": f"placement: {placed.describe()}"})
        offload = offload_folder(ctx) if "disk" in placed.devices else None
        try:
            model, tokenizer = load_model(loaded / "model", device_map=None if placed.devices == {"cpu"} else
                                          placed.device_map, offload_dir=offload)
            check_seq_len(calib.seq_len, loaded.metadata)
            windows = data.token_windows(tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
            plan = (autoquant.plan(spec, model, ctx.input("sensitivity").path) if spec.format == "auto"
                    else plan_quantization(spec, model))
            batches = [b.to(placed.input_device) for b in torch.split(windows, calib.batch_size)]
            # The logits (batch x seq x vocab) are calibration's largest activation: only a quantized output layer
            # needs them all, otherwise each sequence's last position is computed.
            output_layer = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
            forward = {"logits_to_keep": 0 if output_layer in plan.quantized_layers else 1}
            by_layer = layerwise.wanted(calib.layerwise, spec.algorithm, placed.spills)
            before = weight_digests(model)
            started = time.time()
            if by_layer:
                resumed_at = calibrate_by_layer(ctx, model, plan.config, batches, forward)
            else:
                resumed_at = None
                calibrate_whole_model(ctx, model, plan.config, batches, forward)
            seconds = time.time() - started
            saved = save_calibration(model, loaded / "model", ctx.out, before)
        finally:
            if offload and ctx.recipe.model.offload_dir:  # the scratch area's goes when the artifact commits
                shutil.rmtree(offload, ignore_errors=True)
        (ctx.out / "plan.json").write_text(json.dumps(
            {"config": plan.config, "decisions": plan.decisions, "quantized_layers": plan.quantized_layers,
             "excluded_layers": plan.excluded_layers, "layer_formats": plan.layer_formats}, indent=2, default=str))
        return CalibrationFacts(
            format=spec.format, algorithm=spec.algorithm, kv_cache=spec.kv_cache,
            model_dtype=str(model.dtype).removeprefix("torch."), block_size=plan.block_size,
            decisions=plan.decisions, quantized_layers=len(plan.quantized_layers),
            excluded_layers=len(plan.excluded_layers), layer_formats=plan.layer_formats, tokens=int(windows.numel()),
            calibration_seconds=round(seconds, 2), placement=placed.to_json(), layerwise=by_layer,
            resumed_at_layer=resumed_at, state_tensors=saved["tensors"],
            rescaled_weights=saved["rescaled_weights"], state_bytes=saved["bytes"],
            state_ratio=saved["bytes"] / loaded.facts.weights_bytes)


def calibrate_whole_model(ctx: StageContext, model, config: dict, batches: list, forward: dict) -> None:
    """ModelOpt's calibration over the whole model (`forward`: keyword arguments of each batch's forward pass),
    progress counted in layer forwards."""
    import torch

    from pipeline.quant import library_prints, modelopt

    spec, calib = ctx.recipe.quantization, ctx.recipe.calibration
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
                m(batch, **forward)

    mtq, _ = modelopt()
    with library_prints(on_line=announce):
        mtq.quantize(model, config, forward_loop)


@contextlib.contextmanager
def _without_modelopt_bar() -> Iterator[None]:
    """ModelOpt draws its own layer bar on stderr and passes `disable` explicitly, so TQDM_DISABLE cannot quiet it
    (`run -q` must print nothing); LayerProgress draws ours."""
    from unittest import mock

    from modelopt.torch.quantization import model_calib
    from tqdm import tqdm

    with mock.patch.object(model_calib, "tqdm", lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})):
        yield


def calibrate_by_layer(ctx: StageContext, model, config: dict, batches: list, forward: dict) -> int:
    """ModelOpt's layerwise calibration, checkpointed per layer in the scratch area: a killed run resumes at the
    layer it was on. Returns the layer this run started at."""
    import torch
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    from pipeline import layerwise
    from pipeline.quant import library_prints, modelopt

    mtq, _ = modelopt()  # registers ModelOpt's decoder-layer discovery for transformers models
    decoder_layers = LayerActivationCollector.get_decoder_layers(model)
    if not decoder_layers:
        raise BadInput(f"ModelOpt finds no decoder layers in {type(model).__name__} to calibrate one by one; "
                       "set calibration.layerwise: off")
    algorithm = config["algorithm"]
    checkpoints = layerwise.Checkpoints(ctx.scratch, len(decoder_layers), algorithm)
    config = {**config, "algorithm": checkpoints.algorithm_config(algorithm)}
    start = checkpoints.resume()
    progress = LayerProgress(ctx, len(decoder_layers), start)

    def forward_loop(m) -> None:
        """Called by ModelOpt before each layer, after it committed the previous one."""
        for index in checkpoints.finished():
            progress.finished(index)
        with torch.no_grad():
            for batch in batches:
                m(batch, **forward)

    try:
        with library_prints(), _without_modelopt_bar():
            mtq.quantize(model, config, forward_loop)
        for index in checkpoints.finished():
            progress.finished(index)
    finally:
        progress.close()
    layerwise.forget_layerwise(model, algorithm)
    return start
