"""The model card (README.md) that travels with every exported checkpoint and published engine."""

from __future__ import annotations

from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
from pipeline.serving import MODELOPT_METHOD
from pipeline.store import Artifact


def render(facts: dict) -> str:
    """Markdown from the facts the stages recorded; quality numbers appear once verify has run."""
    lines = [
        f"# {facts['model']} ({facts['format']}, {facts['artifact']})",
        "",
        f"Quantized by quantpipe from `{facts['model']}` ({facts['parameters'] / 1e6:.1f}M parameters, "
        f"{facts['architecture']}).",
        "",
        "| | |",
        "| --- | --- |",
        f"| format | {facts['format']} (algorithm {facts['algorithm']}, KV cache {facts['kv_cache']}) |",
        f"| block size | {facts['block_size'] or 'n/a'} |",
        f"| calibration | {facts['calibration_tokens']} tokens of `{facts['calibration_dataset']}` "
        f"(seed {facts['calibration_seed']}) |",
        f"| parallelism | tp {facts['tp']} x pp {facts['pp']} |",
        f"| size | {human_bytes(facts['bytes'])} ({facts['bytes'] / facts['fp16_bytes']:.2f}x of fp16 "
        f"{human_bytes(facts['fp16_bytes'])}) |",
        f"| target | {facts.get('target') or 'any: the checkpoint does not depend on the target GPU'} |",
    ]
    if facts.get("decisions"):
        lines += ["", "## Decisions", "", *(f"- {d}" for d in facts["decisions"])]
    quality = facts.get("quality")
    lines += ["", "## Quality", ""]
    if quality:
        lines += [*(f"- {row}" for row in quality_lines(quality)), "- full report: [report.md](../report.md)"]
    else:
        lines.append("Not verified yet: run `quantpipe run` through the verify stage.")
    if facts.get("search"):
        lines += ["", *search_section(facts["search"])]
    lines += ["", "## How to load it", "", loading(facts["export"], facts["format"]), ""]
    if facts.get("serving"):
        lines += ["## Serve it", "", *facts["serving"], ""]
    return "\n".join(lines)


def quality_lines(quality: dict) -> list[str]:
    """Each verified metric by name with its threshold (`quality`: verify's metrics and thresholds)."""
    from pipeline.verify.metrics import shown

    rows = (shown(name, value, quality["thresholds"].get(name)) for name, value in quality["metrics"].items())
    return [f"{label}: {value} ({bound})" for label, value, bound in rows]


def search_section(search: dict) -> list[str]:
    """How `quantpipe tune` chose this artifact: the bar and every candidate it measured."""
    lines = ["## How it was chosen", "",
             (f"`quantpipe tune` picked the smallest {search['objective']} meeting {search['bar']} on the held-out "
              f"text among {len(search['candidates'])} candidates:"), "",
             "| candidate | result | ppl ratio | agreement | size vs fp16 | bits |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in search["candidates"]:
        if c["ppl_ratio"] is None:
            lines.append(f"| {c['label']} | not run: {c['error']} | | | | |")
            continue
        result = "**chosen**" if c["chosen"] else "pass" if c["passed"] else "fail"
        lines.append(f"| {c['label']} | {result} | {c['ppl_ratio']:.3f} | {c['agreement']:.1%} | "
                     f"{c['bytes'] / c['fp16_bytes']:.3f}x | {c['bits']:.2f} |")
    return lines


def loading(export: str, fmt: str) -> str:
    """What actually loads each kind of export: they are three different layouts for different runtimes."""
    if export == "trtllm":
        return ("A TensorRT-LLM checkpoint (config.json + rank{N}.safetensors, one per tp x pp rank): only "
                "TensorRT-LLM reads it. Build an engine with `trtllm-build --checkpoint_dir <this folder>` "
                "(TensorRT-LLM 1.2 or older), or let quantpipe do it (`build.backend: trtllm`). vLLM, SGLang and "
                "transformers do not load this layout.")
    if export == "onnx":
        runtime = ("Its FP4 ops (TRT_FP4DynamicQuantize, TRT_FP4QDQ) run in TensorRT only, not in onnxruntime."
                   if fmt.startswith("nvfp4") else "onnxruntime also runs it (CPU or GPU), e.g. to check outputs.")
        return ("An ONNX decoder with Q/DQ nodes and an explicit KV cache (inputs input_ids, attention_mask, "
                "past_key, past_value; outputs logits, present_key, present_value). Build a TensorRT-RTX engine "
                f"from it (quantpipe `build.backend: tensorrt-rtx`). {runtime} It is not a checkpoint for "
                "TensorRT-LLM, vLLM or SGLang.")
    served = tuple(MODELOPT_METHOD)  # the formats vLLM's and SGLang's ModelOpt loaders read
    serving = (f"vLLM and SGLang load it too (ModelOpt {fmt.upper()} checkpoint)." if fmt in served
               else f"vLLM and SGLang read ModelOpt checkpoints in {' and '.join(f.upper() for f in served)} only, not {fmt}.")
    return ("ModelOpt's unified Hugging Face checkpoint (hf_quant_config.json): TensorRT-LLM's LLM API (PyTorch "
            f"backend; quantpipe `build.backend: trtllm-pytorch`) loads it. {serving} Plain transformers does not "
            "dequantize this layout.")


def facts(recipe: Recipe, artifacts: dict[str, Artifact]) -> dict:
    model, calibration = artifacts["load"].facts, artifacts["calibrate"].facts
    return {"model": model.name, "parameters": model.parameters, "architecture": model.architecture,
            "format": calibration.format, "algorithm": calibration.algorithm, "kv_cache": calibration.kv_cache,
            "block_size": calibration.block_size, "calibration_tokens": calibration.tokens,
            "calibration_dataset": recipe.calibration.dataset, "calibration_seed": recipe.calibration.seed,
            "decisions": calibration.decisions, "fp16_bytes": model.parameters * 2, "target": recipe.target.gpu}


def sharding(recipe: Recipe, fmt: str) -> dict:
    """The facts that differ between one run's exports: which export it is (its card says what loads it) and its
    sharding."""
    tp, pp = (recipe.export.tp, recipe.export.pp) if fmt == "trtllm" else (1, 1)
    return {"export": fmt, "tp": tp, "pp": pp}
