"""verify: prove the artifacts right before anyone spends GPU time on them. Structure of every export, its
dequantized weights and logits against the calibrated model, perplexity and greedy-generation agreement against the
unquantized model on held-out text; report.json, report.md and a plot. A missed threshold fails the run (exit 5),
and the failing report stays in the store like any other result."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline import contracts, data, lmeval
from pipeline.errors import BadInput
from pipeline.recipe import DEFAULT_THRESHOLDS, Recipe
from pipeline.stages.base import Stage, StageContext
from pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

# Relative error allowed between an export's dequantized layer and the calibrated one: exporters requantize fused
# layers (q/k/v, gate/up) with a shared scale, which moves values by up to a quantization step.
LAYER_TOLERANCE = {"fp8": 0.1, "int8_sq": 0.1, "int4_awq": 0.5, "w4a8_awq": 0.5, "nvfp4": 0.25, "nvfp4_awq": 0.25,
                   "auto": 0.25}  # auto: its loosest candidate's (nvfp4)
# Norms whose scale an exporter may fold AWQ/SmoothQuant pre-quant scales into, and the layers they feed (Llama-like).
FOLDED_NORMS = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
                "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
                "mlp.up_proj": "post_attention_layernorm"}


def thresholds(recipe: Recipe) -> dict:
    ppl, agree, cosine = DEFAULT_THRESHOLDS[recipe.quantization.format]
    v = recipe.verify
    return {"ppl_ratio_max": v.ppl_ratio_max or ppl, "agreement_min": agree if v.gen_agreement_min is None
            else v.gen_agreement_min, "parity_cosine_min": v.parity_cosine_min or cosine}


class Verify(Stage):
    name = "verify"
    version = "6"  # 4: lm-eval tasks; 5: the HF checkpoint is checked against the serving engines' loader contracts;
    # 6: the per-layer formats of format auto in the report
    inputs = ("load", "calibrate", "export", "build")  # build only when the recipe has a backend
    fields = ("verify",)
    libraries = ("torch", "transformers", "nvidia-modelopt", "safetensors", "lm-eval")

    def params(self, recipe: Recipe, store: ArtifactStore) -> dict:
        return {**super().params(recipe, store), "data": data.fingerprint(recipe.verify.dataset, store),
                "thresholds": thresholds(recipe)}

    def preflight(self, recipe: Recipe, model: dict) -> None:
        if recipe.verify.tasks:
            lmeval.check_tasks(list(recipe.verify.tasks))
        shared = data.shared_paragraphs(recipe.calibration.dataset, recipe.verify.dataset)
        if shared:
            raise BadInput(f"verify.dataset shares {shared} paragraphs with calibration.dataset; evaluate on "
                           "held-out text (the shipped 'eval' set is disjoint from 'calib')")

    def summary(self, metadata: dict) -> str:
        verdict = "passed" if metadata["passed"] else "FAILED"
        return (f"{verdict}: ppl ratio {metadata['ppl_ratio']:.3f}, agreement {metadata['agreement']:.0%}, "
                f"parity cos {min(metadata['parity'].values(), default=1.0):.4f}")

    def failure(self, metadata: dict) -> str | None:
        if metadata["passed"]:
            return None
        return "verification failed: " + "; ".join(metadata["failures"])

    def run(self, ctx: StageContext) -> dict:
        from pipeline import evaluate, report
        from pipeline.modeling import load_model
        from pipeline.quant import fold_weight_quantization, modelopt, restore_calibration

        recipe, spec, limits = ctx.recipe, ctx.recipe.verify, ctx.params["thresholds"]
        loaded, calibrated, exported = ctx.input("load"), ctx.input("calibrate"), ctx.input("export")
        original, tokenizer = load_model(loaded / "model")
        windows = evaluate.eval_windows(tokenizer, data.load_documents(spec.dataset), spec.tokens, spec.seq_len)
        quantized, _ = load_model(loaded / "model")
        restore_calibration(quantized, calibrated.path)
        folded = fold_weight_quantization(quantized)
        tolerance = LAYER_TOLERANCE[recipe.quantization.format]
        on = evaluate.describe_windows(windows)

        ppl_original = evaluate.perplexity(original, _steps(ctx.track, windows, f"perplexity, unquantized: {on}"))
        ppl_quantized = evaluate.perplexity(quantized, _steps(ctx.track, windows, f"perplexity, quantized: {on}"))
        prompts = [evaluate.prompt_ids(tokenizer, p) for p in spec.prompts]
        asked = f"{len(prompts)} prompts x {spec.max_new_tokens} new tokens"
        texts_original = evaluate.generate(original, tokenizer, _steps(
            ctx.track, prompts, f"greedy generation, unquantized: {asked}"), spec.max_new_tokens)
        texts_quantized = evaluate.generate(quantized, tokenizer, _steps(
            ctx.track, prompts, f"greedy generation, quantized: {asked}"), spec.max_new_tokens)
        agree = evaluate.agreement(quantized, _steps(ctx.track, prompts, f"teacher-forced agreement: {asked}"),
                                   texts_original)

        # The ONNX decoder and the engine built from it quantize activations too: compare them with the fully
        # quantized model, on the same windows as its perplexity.
        exports, failures = {}, []
        if "onnx" in exported.metadata["formats"]:
            exports["onnx"] = _check_onnx(exported.path / "onnx", quantized, folded, original, windows, limits,
                                          tolerance, ctx.track)
        engine_status, engine_run = _check_engine(ctx.inputs.get("build"), recipe, quantized, windows, limits,
                                                  ctx.track)
        lm_eval = _lm_eval(spec, original, quantized, tokenizer, failures) if spec.tasks else None
        # Parity: weight-only view of the calibrated model (activation and KV quantizers off, pre-quant scales kept)
        # against a plain model holding each export's dequantized weights.
        mtq, _ = modelopt()
        for pattern in ("*input_quantizer", "*output_quantizer", "*_bmm_quantizer"):
            mtq.disable_quantizer(quantized, pattern)
        for fmt in exported.metadata["formats"]:
            if fmt != "onnx":
                exports[fmt] = self._check_export(exported.path / fmt, quantized, folded, original, loaded, windows,
                                                  recipe, ctx.track)
        for fmt, result in exports.items():
            failures += [f"{fmt}: {p}" for p in result["problems"]]
            failures += [f"{fmt}: {layer['layer']} dequantizes {layer['error']:.2f} away from the calibrated layer "
                         f"(tolerance {layer['tolerance']}): check {layer['tensors']}" for layer in result["bad_layers"]]
            if result["parity"] and result["parity"]["cosine"] < limits["parity_cosine_min"]:
                failures.append(f"{fmt}: logit cosine {result['parity']['cosine']:.4f} < "
                                f"{limits['parity_cosine_min']}")
        if "hf" in exports:  # what the serving engines' ModelOpt loaders would refuse
            exports["hf"]["contract"] = contracts.check(exported.path / "hf")
            failures += [f"hf: loader contract: {p}" for p in exports["hf"]["contract"]]
        failures += [f"engine: {p}" for p in (engine_run or {}).get("problems", [])]
        ratio = ppl_quantized / ppl_original
        if ratio > limits["ppl_ratio_max"]:
            failures.append(f"perplexity ratio {ratio:.3f} > {limits['ppl_ratio_max']}")
        if agree < limits["agreement_min"]:
            failures.append(f"generation agreement {agree:.2f} < {limits['agreement_min']}")

        result = {
            "passed": not failures, "failures": failures, "thresholds": limits, "format": recipe.quantization.format,
            "layer_tolerance": tolerance, "eval_tokens": int(windows.numel()),
            "eval_windows": {"count": windows.shape[0], "length": windows.shape[1]},
            "ppl_original": round(ppl_original, 4), "ppl_quantized": round(ppl_quantized, 4),
            "ppl_ratio": round(ratio, 4), "agreement": round(agree, 4),
            "parity": {fmt: r["parity"]["cosine"] for fmt, r in exports.items() if r["parity"]},
            "exports": {fmt: {k: v for k, v in r.items() if k != "layers"} for fmt, r in exports.items()},
            "prompt_format": "chat template" if evaluate.uses_chat_template(tokenizer) else "raw text",
            "generations": [{"prompt": p, "original": tokenizer.decode(a, skip_special_tokens=True),
                             "quantized": tokenizer.decode(b, skip_special_tokens=True)}
                            for p, a, b in zip(spec.prompts, texts_original, texts_quantized)],
            "engine": engine_status, "engine_run": engine_run, "lm_eval": lm_eval,
            "sizes": {fmt: info["bytes"] for fmt, info in exported.metadata["formats"].items()},
            "fp16_bytes": exported.metadata["fp16_bytes"],
            "layer_formats": calibrated.metadata.get("layer_formats", {}),
        }
        report.write(ctx.out, result, {fmt: r["layers"] for fmt, r in exports.items()})
        return result

    @staticmethod
    def _check_export(folder: Path, quantized, folded: list[str], original, loaded, windows, recipe: Recipe,
                      track) -> dict:
        import torch

        from pipeline import evaluate
        from pipeline.dequant import effective_weights, read_config
        from pipeline.modeling import expert_slices, expert_weight, load_model

        info = read_config(folder)
        fmt = folder.name
        problems = _config_problems(info, quantized.config, recipe)
        world = recipe.export.tp * recipe.export.pp if info["layout"] == "trtllm" else 1
        if world > 1:
            # Shards are checked for completeness; the tensors themselves through the unsharded HF export.
            ranks = sorted(p.name for p in folder.glob("rank*.safetensors"))
            if len(ranks) != world:
                problems.append(f"{len(ranks)} rank files for tp x pp = {world}")
            return {"quant_algo": info["quant_algo"], "kv_cache_quant_algo": info["kv_cache_quant_algo"],
                    "group_size": info["group_size"], "problems": problems, "bad_layers": [], "layers": [],
                    "parity": None, "shards": ranks}
        shapes = {n: tuple(m.weight.shape) for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
        experts = expert_slices(quantized)  # every expert is checked, not only those calibration reached
        shapes |= {name: tuple(expert_weight(quantized, where).shape) for name, where in experts.items()}
        weights, weight_problems = effective_weights(folder, shapes)
        problems += weight_problems
        plain, _ = load_model(loaded / "model")
        state = plain.state_dict()
        plain.load_state_dict({k: v.to(state[k].dtype) for k, v in weights.items() if k in state}, strict=False)
        with torch.no_grad():
            for name, where in experts.items():
                if f"{name}.weight" in weights:
                    expert_weight(plain, where).copy_(weights[f"{name}.weight"])
        layers = _layer_errors(quantized, _steps(track, folded, f"{fmt}: dequantized layers vs calibrated"),
                               original, weights, info) + _expert_errors(quantized, experts, weights)
        bad = _over_tolerance(layers, LAYER_TOLERANCE[recipe.quantization.format])
        on = evaluate.describe_windows(windows)
        parity = evaluate.compare_on_windows(lambda window: plain(window[None]).logits[0], quantized, _steps(
            track, windows, f"{fmt}: dequantized export vs calibrated model, logits and perplexity: {on}"))
        return {"quant_algo": info["quant_algo"], "kv_cache_quant_algo": info["kv_cache_quant_algo"],
                "group_size": info["group_size"], "problems": problems, "bad_layers": bad[:5], "layers": layers,
                "parity": {k: parity[k] for k in ("cosine", "max_abs_error")}, "ppl_dequantized": parity["ppl"]}


def _lm_eval(spec, original, quantized, tokenizer, failures: list[str]) -> dict:
    """The recipe's lm-eval tasks on both models (quantizers on) with the same settings; misses join `failures`."""
    settings = {"batch_size": spec.task_batch_size, "num_fewshot": spec.task_fewshot, "seed": spec.task_seed,
                "limit": spec.task_limit, "dataset": spec.dataset}
    before = lmeval.run_tasks(original, tokenizer, list(spec.tasks), **settings)
    after = lmeval.run_tasks(quantized, tokenizer, list(spec.tasks), **settings)
    rows, misses = lmeval.task_deltas(before, after, spec.task_thresholds)
    failures += misses
    return {"settings": before["settings"], "rows": rows}


def _steps(track, items, description: str):
    """`items` through the stage's progress display, with their count as its total."""
    items = list(items)
    return track(items, total=len(items), description=description)


def _check_onnx(folder: Path, quantized, folded: list[str], original, windows, limits: dict, tolerance: float,
                track) -> dict:
    """Run the Q/DQ ONNX decoder in onnxruntime (see _check_decoder). A graph with TensorRT-only ops (NVFP4's
    dynamic FP4 quantization) cannot run there: its weights are dequantized by hand and compared layer by layer
    instead, and the report says onnxruntime did not run it."""
    import onnx

    from pipeline.dequant import onnx_fp4_weights
    from pipeline.onnx_export import OrtDecoder
    from pipeline.stages.export import ONNX_FILE

    trt_only = sorted({n.op_type for n in onnx.load(str(folder / ONNX_FILE), load_external_data=False).graph.node
                       if n.domain == "trt"})
    if trt_only:
        layers = _layer_errors(quantized, _steps(track, folded, "onnx: FP4 weights vs calibrated layers"), original,
                               onnx_fp4_weights(folder / ONNX_FILE), {"layout": "onnx"})
        bad = _over_tolerance(layers, tolerance)
        problems = [] if layers else ["no FP4 weights found in the ONNX"]
        return {"problems": problems, "bad_layers": bad, "layers": layers, "parity": None,
                "onnxruntime": f"not run: {', '.join(trt_only)} only run in TensorRT; FP4 weights checked instead",
                "max_layer_error": max((row["error"] for row in layers), default=None), "tolerance": tolerance}
    return _check_decoder(OrtDecoder(folder / ONNX_FILE), "onnxruntime", quantized, windows, limits, track)


KV_CHECK_PROMPT, KV_CHECK_STEPS, SPEED_STEPS = 128, 3, 32


def _check_decoder(decoder, runtime: str, quantized, windows, limits: dict, track) -> dict:
    """`decoder` (the exported graph in some runtime) against the calibrated model: a prefill over each evaluation
    window (top-1 agreement, logit cosine, and perplexity on the very windows the PyTorch perplexities use),
    greedy steps through its KV cache against a full recompute, and the decode speed."""
    import time

    import numpy as np
    import torch

    from pipeline.evaluate import compare_on_windows, describe_windows

    config = quantized.config
    on = describe_windows(windows)
    compared = compare_on_windows(
        lambda window: torch.from_numpy(decoder.prefill_then_decode(config, window.numpy(), steps=0)[0]), quantized,
        _steps(track, windows, f"{runtime}: prefill vs the calibrated model, logits and perplexity: {on}"))
    prompt = windows[0][:KV_CHECK_PROMPT]
    _, steps = decoder.prefill_then_decode(config, prompt.numpy(), KV_CHECK_STEPS, progress=lambda r: _steps(
        track, r, f"{runtime}: KV-cache decoding vs a full recompute"))
    with torch.no_grad():
        extended = torch.cat([prompt, torch.tensor(steps)])
        recomputed = quantized(extended[None]).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    started = time.perf_counter()
    decoder.prefill_then_decode(config, prompt[:8].numpy(), SPEED_STEPS, progress=lambda r: _steps(
        track, r, f"{runtime}: decode speed, {SPEED_STEPS} single-token steps"))
    tokens_per_second = SPEED_STEPS / (time.perf_counter() - started)  # one short prefill, then the steps
    problems = []
    if compared["agreement"] < limits["agreement_min"]:
        problems.append(f"{runtime} top-1 agreement {compared['agreement']:.2f} with the calibrated model < "
                        f"{limits['agreement_min']}")
    kv_match = float(np.mean([a == b for a, b in zip(steps, recomputed)]))
    if kv_match < 1.0:
        problems.append(f"{runtime}: KV-cache decoding disagrees with a full recompute on {1 - kv_match:.0%} of steps")
    return {"problems": problems, "bad_layers": [], "layers": [], "parity": None, **compared, "ppl_windows": on,
            "kv_cache_steps_match": kv_match, "tokens_per_second": round(tokens_per_second, 1)}


def _check_engine(build, recipe: Recipe, quantized, windows, limits: dict, track) -> tuple[str, dict | None]:
    """Run the engine where this host has a GPU it was built for; otherwise say why not. An engine is never
    claimed to pass without having run."""
    from pipeline.backends.tensorrt_rtx import ENGINE_FILE, engine_decoder, runnable_here
    from pipeline.fmt import human_bytes

    if build is None:
        return "no engine built (build.backend: none)", None
    backend, size = build.metadata["backend"], human_bytes(build.metadata.get("engine_bytes", build.size))
    if backend != "tensorrt-rtx":
        warmed = " (the build loaded it and generated once)" if backend == "trtllm-pytorch" else ""
        return f"{backend} build made ({size}){warmed}; not run by verify: it runs TensorRT-RTX engines only", None
    gpu = runnable_here(build.metadata)
    if gpu is None:
        wanted = "/".join(f"sm_{cc.removeprefix('SM')}" for cc in build.metadata["compute_capability"].split(","))
        return f"{backend} engine built ({size}); not run: no {wanted} GPU on this host", None
    fitting = windows[:, :recipe.build.max_input_len]  # the engine's profile caps one prefill's length
    result = _check_decoder(engine_decoder(build / ENGINE_FILE), f"engine on {gpu}", quantized, fitting, limits, track)
    return (f"{backend} engine ({size}) ran on {gpu}: top-1 agreement {result['agreement']:.1%}, cosine "
            f"{result['cosine']:.4f}, {result['tokens_per_second']} tokens/s"), result


def _expert_errors(quantized, experts: dict, weights: dict) -> list[dict]:
    """Per expert projection: relative distance between the export's weight and the calibrated expert's."""
    import torch

    from pipeline.modeling import expert_weight

    rows = []
    with torch.no_grad():
        for name, where in experts.items():
            if f"{name}.weight" not in weights:
                continue
            reference = expert_weight(quantized, where, fake_quantized=True).float()
            error = ((weights[f"{name}.weight"] - reference).norm() / reference.norm().clamp_min(1e-12)).item()
            rows.append({"layer": name, "error": round(error, 5), "tensors": f"{name}.weight / {name}.weight_scale"})
    return rows


def _over_tolerance(layers: list[dict], tolerance: float) -> list[dict]:
    return [{**row, "tolerance": tolerance} for row in layers if row["error"] > tolerance]


def _config_problems(info: dict, model_config, recipe: Recipe) -> list[str]:
    """Config fields that must agree with the model and the recipe (the tensors are checked separately)."""
    from pipeline.quant import rope_theta

    problems = []
    kv_expected = {"none": None, "fp8": "FP8", "nvfp4": "NVFP4"}[recipe.quantization.kv_cache]
    if info["kv_cache_quant_algo"] != kv_expected:
        problems.append(f"kv_cache_quant_algo {info['kv_cache_quant_algo']!r}, recipe asks {kv_expected!r}")
    if info["layout"] == "trtllm":
        rotary = info["config"].get("rotary_base")
        if rope_theta(model_config) and rotary != rope_theta(model_config):
            problems.append(f"rotary_base {rotary} in config.json, the model uses {rope_theta(model_config)}")
        mapping = info["config"].get("mapping", {})
        if (mapping.get("tp_size"), mapping.get("pp_size")) != (recipe.export.tp, recipe.export.pp):
            problems.append(f"mapping tp {mapping.get('tp_size')} pp {mapping.get('pp_size')}, recipe asks "
                            f"tp {recipe.export.tp} pp {recipe.export.pp}")
    return problems


def _layer_errors(quantized, folded: Iterable[str], original, weights: dict, info: dict) -> list[dict]:
    """Per quantized layer: relative distance between the export's effective weight and the calibrated one
    (`folded` layers hold their fake-quantized weight). In the TensorRT-LLM layout q/k/v and gate/up are fused
    into one weight with one scale, the largest of its parts', so all but the largest part requantize coarser:
    those rows say `shared_scale`."""
    import torch

    rows = []
    original_state = original.state_dict()
    with torch.no_grad():
        for name in folded:
            module = quantized.get_submodule(name)
            if f"{name}.weight" not in weights:
                continue
            reference = module.weight.float()
            pqs = getattr(module.input_quantizer, "pre_quant_scale", None)
            if pqs is not None:
                reference = reference * pqs.float().reshape(1, -1)
            exported = weights[f"{name}.weight"]
            layer, _, leaf = name.partition(".layers.")
            index, _, sub = leaf.partition(".")
            norm = FOLDED_NORMS.get(sub)
            norm_key = f"{layer}.layers.{index}.{norm}.weight"
            if norm and norm_key in weights and norm_key in original_state:
                exported = exported * (weights[norm_key] / original_state[norm_key].float()).reshape(1, -1)
            error = ((exported - reference).norm() / reference.norm().clamp_min(1e-12)).item()
            tensors = {"hf": f"{name}.weight / {name}.weight_scale",
                       "onnx": f"the ONNX initializers model.{name}.weight_f4 / _f8_scale"}.get(
                info["layout"], f"the TensorRT-LLM tensors of {name} (weights / weights_scaling_factor)")
            rows.append({"layer": name, "error": round(error, 5), "tensors": tensors,
                         "shared_scale": info["layout"] == "trtllm" and sub in FOLDED_NORMS})
    return rows
