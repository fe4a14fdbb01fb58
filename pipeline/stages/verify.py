"""verify: prove the artifacts right before anyone spends GPU time on them (the checks live in pipeline/verify/).
Structure of every export, its dequantized weights and logits against the calibrated model, and the metrics
(perplexity ratio, generation agreement...) against the unquantized model's cached results (the reference stage);
report.json, report.md and a plot. A missed threshold fails the run (exit 5), and the failing report stays in the
store like any other result."""

from __future__ import annotations

import json
import logging

from pipeline import contracts, data, formats, lmeval
from pipeline.errors import BadInput
from pipeline.facts import Facts
from pipeline.recipe import Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.state import MODEL_STATE, replay
from pipeline.store import ArtifactStore
from pipeline.verify import metrics

log = logging.getLogger(__name__)

STEPS_FILE = "steps.json"  # each sub-step's seconds and resident memory (before, peak, after)


class VerifyFacts(Facts):
    """The verdict, every metric by name with its threshold, what they were computed from, and each check's detail
    (report.json holds the same and the per-layer tables)."""

    passed: bool
    failures: list[str]
    metrics: dict[str, float]  # pipeline/verify/metrics.py, by name
    thresholds: dict[str, float]
    ppl_original: float
    ppl_quantized: float
    agreement: float
    top1_agreement: float
    parity: dict[str, float]  # export -> logit cosine of its dequantized weights vs the calibrated model
    format: str
    layer_tolerance: float
    eval_tokens: int
    eval_windows: dict[str, int]
    exports: dict[str, dict]  # export -> its checks (problems, parity, contract, ONNX runtime results...)
    prompt_format: str
    generations: list[dict[str, str]]
    engine: str  # what happened to the engine: ran (and how it did) or why not
    engine_run: dict | None
    lm_eval: dict | None
    sizes: dict[str, int]
    fp16_bytes: int
    layer_formats: dict[str, str]


class Verify(Stage):
    name = "verify"
    # 4: lm-eval tasks; 5: the HF checkpoint is checked against the serving engines' loader contracts; 6: metrics by
    # name, the unquantized model's results from the reference stage, batched windows; 7: the per-layer formats of
    # format auto in the report; 8: one model resident (parity on the calibrated model run as a plain one),
    # steps.json
    version = "8"
    inputs = ("load", "reference", *MODEL_STATE, "export", "build")  # build only when the recipe has a backend
    fields = ("verify",)
    libraries = ("torch", "transformers", "nvidia-modelopt", "safetensors", "lm-eval")
    Facts = VerifyFacts

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.verify.dataset, store),
                "thresholds": metrics.thresholds(recipe.quantization.format, recipe.verify.thresholds)}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        problem = metrics.unknown(recipe.verify.thresholds)
        if problem:
            raise BadInput(problem)
        if recipe.verify.tasks:
            lmeval.check_tasks(list(recipe.verify.tasks))
        shared = data.shared_paragraphs(recipe.calibration.dataset, recipe.verify.dataset)
        if shared:
            raise BadInput(f"verify.dataset shares {shared} paragraphs with calibration.dataset; evaluate on "
                           "held-out text (the shipped 'eval' set is disjoint from 'calib')")

    def summary(self, facts: VerifyFacts) -> str:
        return f"{'passed' if facts.passed else 'FAILED'}: {metrics.describe(facts.metrics)}"

    def failure(self, facts: VerifyFacts) -> str | None:
        if facts.passed:
            return None
        return "verification failed: " + "; ".join(facts.failures)

    def run(self, ctx: StageContext) -> VerifyFacts:
        from pipeline.verify import evaluate, report
        from pipeline.verify.reference import Reference
        from pipeline.verify.steps import Steps

        recipe, spec, limits = ctx.recipe, ctx.recipe.verify, ctx.params["thresholds"]
        exported = ctx.input("export")
        unquantized = Reference.read(ctx.input("reference").path)
        steps = Steps(ctx.report)
        try:
            exports, failures, scored, agree, texts_quantized, engine_status, engine_run, lm_eval, tokenizer, \
                windows, tolerance = self._checks(ctx, steps, unquantized)
        finally:
            steps.close()
            (ctx.out / STEPS_FILE).write_text(json.dumps(steps.rows, indent=2))
        for fmt, result in exports.items():
            failures += [f"{fmt}: {p}" for p in result["problems"]]
            failures += [f"{fmt}: {layer['layer']} dequantizes {layer['error']:.2f} away from the calibrated layer "
                         f"(tolerance {layer['tolerance']}): check {layer['tensors']}"
                         for layer in result["bad_layers"]]
        if "hf" in exports:  # what the serving engines' ModelOpt loaders would refuse
            exports["hf"]["contract"] = contracts.check(exported.path / "hf")
            failures += [f"hf: loader contract: {p}" for p in exports["hf"]["contract"]]
        failures += [f"engine: {p}" for p in (engine_run or {}).get("problems", [])]

        measured = {
            "ppl_original": round(unquantized.perplexity, 4),
            "ppl_quantized": round(evaluate.perplexity_of(scored["losses"]), 4), "agreement": round(agree, 4),
            "top1_agreement": round((scored["top1"] == unquantized.top1).float().mean().item(), 4),
            "parity": {fmt: r["parity"]["cosine"] for fmt, r in exports.items() if r["parity"]},
        }
        values, missed = metrics.evaluate(measured, limits)
        failures += missed
        result = {
            "passed": not failures, "failures": failures, "metrics": values, "thresholds": limits, **measured,
            "format": recipe.quantization.format, "layer_tolerance": tolerance, "eval_tokens": int(windows.numel()),
            "eval_windows": {"count": windows.shape[0], "length": windows.shape[1]},
            "exports": {fmt: {k: v for k, v in r.items() if k != "layers"} for fmt, r in exports.items()},
            "prompt_format": "chat template" if evaluate.uses_chat_template(tokenizer) else "raw text",
            "generations": [{"prompt": p, "original": tokenizer.decode(a, skip_special_tokens=True),
                             "quantized": tokenizer.decode(b, skip_special_tokens=True)}
                            for p, a, b in zip(spec.prompts, unquantized.generations, texts_quantized)],
            "engine": engine_status, "engine_run": engine_run, "lm_eval": lm_eval,
            "sizes": {fmt: part.bytes for fmt, part in exported.facts.formats.items()},
            "fp16_bytes": exported.facts.fp16_bytes,
            "layer_formats": ctx.input("calibrate").facts.layer_formats,
        }
        report.write(ctx.out, result, {fmt: r["layers"] for fmt, r in exports.items()})
        return VerifyFacts.model_validate(result)

    def _checks(self, ctx: StageContext, steps, unquantized):
        """Every check, one model resident at a time (the calibrated one; parity runs it as a plain model holding
        each export's weights), each sub-step timed and its memory sampled (steps.json)."""
        from pipeline.modeling import load_model
        from pipeline.quant import modelopt
        from pipeline.verify import checkpoint, evaluate
        from pipeline.verify.engine import check_engine
        from pipeline.verify.onnx import check_onnx, fused, open_onnx
        from pipeline.verify.steps import layer_progress

        recipe, spec, limits = ctx.recipe, ctx.recipe.verify, ctx.params["thresholds"]
        loaded, exported = ctx.input("load"), ctx.input("export")

        def progress(model, forwards: int, description: str):
            return layer_progress(ctx, model, forwards, description)

        tasks_before = None
        if spec.tasks:
            with steps.step("lm-eval tasks, unquantized"):
                tasks_before = _lm_eval_unquantized(spec, loaded)
        with steps.step("load the calibrated model"):
            quantized, tokenizer = load_model(loaded / "model")
            replay(quantized, ctx.inputs)
            folded = checkpoint.fold_in_place(quantized)
            windows = evaluate.eval_windows(tokenizer, data.load_documents(spec.dataset), spec.tokens, spec.seq_len)
        tolerance = formats.get(recipe.quantization.format).layer_tolerance
        on = evaluate.describe_windows(windows)

        # The ONNX decoder and the engine built from it quantize activations too: compare them with the fully
        # quantized model, on the same windows as its perplexity. onnxruntime's prefills run in the perplexity
        # pass, so the calibrated model's logits on the windows are computed once.
        logits_of, onnx_run, comparison = evaluate.model_logits(quantized), None, None
        if "onnx" in exported.facts.formats:
            with steps.step("onnx: open in onnxruntime"):
                onnx_run = open_onnx(exported.path / "onnx")
            if onnx_run[0] is not None:
                logits_of, comparison = fused(onnx_run[0], quantized.config, logits_of)
        with steps.step("perplexity, quantized" + (" (and onnxruntime's prefills)" if comparison else "")):
            batches = evaluate.batches(windows)
            described = f"perplexity, quantized{' and onnxruntime' if comparison else ''}: {on}"
            with progress(quantized, len(batches), described):
                scored = evaluate.score(logits_of, evaluate.tracked(ctx.track, batches, described))
        with steps.step("generation and agreement, quantized"):
            prompts = [evaluate.prompt_ids(tokenizer, p) for p in spec.prompts]
            asked = f"{len(prompts)} prompts x {spec.max_new_tokens} new tokens"
            texts_quantized = evaluate.generate(quantized, tokenizer, evaluate.tracked(
                ctx.track, prompts, f"greedy generation, quantized: {asked}"), spec.max_new_tokens)
            agree = evaluate.agreement(quantized, evaluate.tracked(
                ctx.track, prompts, f"teacher-forced agreement: {asked}"), unquantized.generations)

        exports, failures = {}, []
        if onnx_run:
            with steps.step("onnx: KV cache and decode speed in onnxruntime, or FP4 weights"):
                exports["onnx"] = check_onnx(exported.path / "onnx", quantized, folded, loaded / "model", windows,
                                             limits, tolerance, ctx.track, onnx_run,
                                             comparison.result() if comparison else None)
            del onnx_run, logits_of, comparison  # the onnxruntime session
        with steps.step("engine"):
            engine_status, engine_run = check_engine(ctx.inputs.get("build"), recipe, quantized, windows, limits,
                                                     ctx.track)
        if spec.tasks:
            with steps.step("lm-eval tasks, quantized"):
                lm_eval = _lm_eval(spec, tasks_before, quantized, tokenizer, failures)
        else:
            lm_eval = None
        # Parity: weight-only view of the calibrated model (activation and KV quantizers off, pre-quant scales kept)
        # against the same model run as a plain one holding each export's dequantized weights in turn.
        mtq, _ = modelopt()
        for pattern in ("*input_quantizer", "*output_quantizer", "*_bmm_quantizer"):
            mtq.disable_quantizer(quantized, pattern)
        for fmt in (fmt for fmt in exported.facts.formats if fmt != "onnx"):
            with steps.step(f"{fmt}: dequantized export vs calibrated"):
                exports[fmt] = checkpoint.check_export(exported.path / fmt, quantized, folded, loaded / "model",
                                                       windows, recipe, ctx.track, progress)
        del quantized  # the report needs no model
        return (exports, failures, scored, agree, texts_quantized, engine_status, engine_run, lm_eval, tokenizer,
                windows, tolerance)


def _lm_eval_unquantized(spec, loaded):
    """The recipe's lm-eval tasks on the unquantized model, run before the calibrated model is loaded and freed
    after, so the two are never resident together. The one check that still runs the unquantized model: the
    harness drives each model itself, so its results depend on the task settings and are not in the reference
    artifact."""
    from pipeline.host import release_memory
    from pipeline.modeling import load_model

    original, tokenizer = load_model(loaded / "model")
    before = lmeval.run_tasks(original, tokenizer, list(spec.tasks), **_task_settings(spec))
    del original
    release_memory()
    return before


def _lm_eval(spec, before: dict, quantized, tokenizer, failures: list[str]) -> dict:
    """The same tasks on the calibrated model (quantizers on) with the same settings, against `before`; misses
    join `failures`."""
    after = lmeval.run_tasks(quantized, tokenizer, list(spec.tasks), **_task_settings(spec))
    rows, misses = lmeval.task_deltas(before, after, spec.task_thresholds)
    failures += misses
    return {"settings": before["settings"], "rows": rows}


def _task_settings(spec) -> dict:
    return {"batch_size": spec.task_batch_size, "num_fewshot": spec.task_fewshot, "seed": spec.task_seed,
            "limit": spec.task_limit, "dataset": spec.dataset}
