"""The model card (README.md) that travels with every exported checkpoint and published engine."""

from __future__ import annotations

from pipeline.fmt import human_bytes
from pipeline.recipe import Recipe
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
        lines += [f"- perplexity ratio vs the unquantized model: {quality['ppl_ratio']:.3f} "
                  f"(threshold {quality['ppl_ratio_max']})",
                  f"- greedy generation token agreement: {quality['agreement']:.1%} "
                  f"(threshold {quality['agreement_min']:.0%})",
                  "- full report: [report.md](../report.md)"]
    else:
        lines.append("Not verified yet: run `quantpipe run` through the verify stage.")
    lines += ["", "Note: this checkpoint uses ModelOpt's quantization layout; plain transformers does not dequantize "
              "it. Load it with TensorRT-LLM, vLLM or SGLang, or build an engine with quantpipe.", ""]
    return "\n".join(lines)


def facts(recipe: Recipe, artifacts: dict[str, Artifact]) -> dict:
    model, calibration = artifacts["load"].metadata, artifacts["calibrate"].metadata
    return {"model": model["name"], "parameters": model["parameters"], "architecture": model["architecture"],
            "format": calibration["format"], "algorithm": calibration["algorithm"],
            "kv_cache": calibration["kv_cache"], "block_size": calibration["block_size"],
            "calibration_tokens": calibration["tokens"], "calibration_dataset": recipe.calibration.dataset,
            "calibration_seed": recipe.calibration.seed, "decisions": calibration["decisions"],
            "fp16_bytes": model["parameters"] * 2, "target": recipe.target.gpu}


def sharding(recipe: Recipe, fmt: str) -> dict:
    return {"tp": recipe.export.tp, "pp": recipe.export.pp} if fmt == "trtllm" else {"tp": 1, "pp": 1}
