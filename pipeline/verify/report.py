"""Verification reports: report.json for machines, report.md for people, plot.png for a glance."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline.fmt import human_bytes, in_unit
from pipeline.verify import metrics

REPORT_JSON, REPORT_MD, PLOT = "report.json", "report.md", "plot.png"
PLOT_UNIT = "MiB"


def write(out: Path, result: dict, layers: dict[str, list[dict]]) -> None:
    (out / REPORT_JSON).write_text(json.dumps({**result, "layers": layers}, indent=2))
    (out / REPORT_MD).write_text(markdown(result))
    plot(out / PLOT, result, layers)


def windows(r: dict) -> str:
    """The windows every perplexity in a report was measured on: perplexities from different windows differ
    (a short window gives its tokens less context), so each one says which."""
    w = r["eval_windows"]
    return f"{w['count']} x {w['length']} tokens"


def markdown(r: dict) -> str:
    on = windows(r)
    lines = [
        f"# Verification: {r['format']} — {'PASSED' if r['passed'] else 'FAILED'}",
        "",
        f"Every perplexity below is measured on the same {r['eval_windows']['count']} windows of "
        f"{r['eval_windows']['length']} held-out tokens ({r['eval_tokens']} tokens), each window scored on its own.",
        "",
        "| check | value | threshold |",
        "| --- | --- | --- |",
        f"| perplexity, unquantized model ({on}) | {r['ppl_original']:.3f} | |",
        f"| perplexity, quantized model ({on}) | {r['ppl_quantized']:.3f} | |",
        *_metric_rows(r),
    ]
    for fmt, e in r["exports"].items():
        lines += _export_rows(fmt, e, r)
        lines.append(f"| {fmt} export size | {human_bytes(r['sizes'][fmt])} "
                     f"({r['sizes'][fmt] / r['fp16_bytes']:.2f}x of fp16) | |")
    lines += ["", f"Engine: {r['engine']}.", ""]
    if r.get("layer_formats"):
        counts = ", ".join(f"{fmt} {n}" for fmt, n in sorted(Counter(r["layer_formats"].values()).items()))
        lines += [f"Per-layer formats chosen by AutoQuantize ({counts} linear layers; plot, right):", "",
                  "| layer | format |", "| --- | --- |",
                  *(f"| {name} | {fmt} |" for name, fmt in r["layer_formats"].items()), ""]
    if r["failures"]:
        lines += ["## Failures", "", *(f"- {f}" for f in r["failures"]), ""]
    if r.get("lm_eval"):
        settings = ", ".join(f"{k} {v}" for k, v in r["lm_eval"]["settings"].items())
        lines += ["## lm-evaluation-harness", "", f"Same settings for both models: {settings}.", "",
                  "| task | metric | unquantized | quantized | delta | worse by | threshold |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  *(f"| {t['task']} | {t['metric']} | {t['original']:.4g} | {t['quantized']:.4g} | {t['delta']:+.4g} "
                    f"| {t['worse_by']:.1%} | {t['threshold']:.0%} |" for t in r["lm_eval"]["rows"]), ""]
    prompting = ("through the tokenizer's chat template, assistant turn opened (instruct model)"
                 if r["prompt_format"] == "chat template" else "as raw text (the tokenizer has no chat template)")
    lines += ["## Generations", "", f"Greedy, prompts given {prompting}.", ""]
    for g in r["generations"]:
        lines += [f"**{g['prompt']}**", "", f"- unquantized: {g['original']!r}", f"- quantized: {g['quantized']!r}", ""]
    lines += ["![size and per-layer error](plot.png)", ""]
    return "\n".join(lines)


def _metric_rows(r: dict) -> list[str]:
    rows = []
    for name, value in r["metrics"].items():
        label, shown, bound = metrics.shown(name, value, r["thresholds"].get(name), windows(r))
        rows.append(f"| {label} (`{name}`) | {shown} | {bound} |")
    return rows


def _export_rows(fmt: str, e: dict, r: dict) -> list[str]:
    t = r["thresholds"]
    if fmt == "onnx" and "onnxruntime" in e:
        return [f"| onnx FP4 weights dequantized vs calibrated layers (max relative error); onnxruntime "
                f"{e['onnxruntime']} | {e['max_layer_error']} | <= {e['tolerance']} |"]
    if fmt == "onnx":
        return [
            f"| onnx in onnxruntime vs the quantized model: top-1 agreement / logit cosine ({e['ppl_windows']}) "
            f"| {e['agreement']:.1%} / {e['cosine']:.4f} | >= {t['gen_agreement']:.0%} |",
            f"| onnx in onnxruntime: perplexity ({e['ppl_windows']}; quantized model in PyTorch: "
            f"{r['ppl_quantized']:.3f}) | {e['ppl']:.3f} | |",
            f"| onnx decode speed in onnxruntime on this host's CPU | {e['tokens_per_second']} tokens/s | |",
            f"| onnx KV-cache decode steps matching a full recompute | {e['kv_cache_steps_match']:.0%} | 100% |",
        ]
    if e["parity"]:
        return [f"| {fmt} export logit cosine vs calibrated model, weights only ({windows(r)}) | {e['parity']['cosine']:.5f} "
                f"(max abs {e['parity']['max_abs_error']}) | >= {t['parity_cosine']} |",
                f"| {fmt} export, dequantized weights (activations unquantized): perplexity ({windows(r)}) | "
                f"{e['ppl_dequantized']:.3f} | |"]
    return [f"| {fmt} export shards | {len(e['shards'])} rank files, checked for completeness | |"]


def plot(path: Path, r: dict, layers: dict[str, list[dict]]) -> None:
    import matplotlib.pyplot as plt

    fig = figure(r, layers)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def figure(r: dict, layers: dict[str, list[dict]]):
    """Sizes (one binary unit, as in the tables) and per-layer export errors against the layer tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed = r.get("layer_formats") or {}
    fig, (left, right, *formats) = plt.subplots(1, 3 if mixed else 2, figsize=(18 if mixed else 12, 5.5),
                                                layout="constrained")
    names = ["fp16", *r["sizes"]]
    sizes = [in_unit(b, PLOT_UNIT) for b in (r["fp16_bytes"], *r["sizes"].values())]
    left.bar(names, sizes, color=["grey", *["tab:blue"] * len(r["sizes"])])
    left.set_ylabel(f"size ({PLOT_UNIT}, 2^20 bytes)")
    left.set_title(f"size; perplexity ratio {r['metrics']['ppl_ratio']:.3f} (max {r['thresholds']['ppl_ratio']}, "
                   f"{windows(r)})")
    for fmt, rows in layers.items():
        for label, marker, part in _series(fmt, rows):
            right.plot([i for i, _ in part], [row["error"] for _, row in part], marker=marker, linestyle="none",
                       label=label)
    if any(layers.values()):
        right.axhline(r["layer_tolerance"], color="tab:red", linestyle="--",
                      label=f"tolerance {r['layer_tolerance']}")
    right.set_xlabel("quantized layer (model order)")
    right.set_ylabel("relative weight error vs calibrated")
    right.set_title("per-layer export error (dequantized export vs calibrated model)")
    if any(layers.values()):
        right.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13))
    else:
        right.text(0.5, 0.5, "no per-layer weights to compare\n(exports checked by running them)",
                   ha="center", va="center", transform=right.transAxes)
    if mixed:
        layer_format_axes(formats[0], mixed)
    return fig


def layer_format_axes(ax, layer_formats: dict[str, str]) -> None:
    """Format auto: the format AutoQuantize chose for each linear layer, in model order, one row per format."""
    names = list(layer_formats)
    order = sorted(set(layer_formats.values()), key=lambda f: (f == "none", f))
    for fmt in order:
        picked = [i for i, name in enumerate(names) if layer_formats[name] == fmt]
        ax.scatter(picked, [order.index(fmt)] * len(picked), marker="s", label=f"{fmt}: {len(picked)} layers")
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(-0.5, len(order) - 0.5)
    ax.set_xlabel("linear layer (model order)")
    ax.set_title("per-layer format chosen by AutoQuantize")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13))


def _series(fmt: str, rows: list[dict]) -> list[tuple[str, str, list[tuple[int, dict]]]]:
    """One plotted series per export with layers, the TensorRT-LLM layout's fused layers apart: q/k/v and
    gate/up share one scale there, so all but the largest of each fused group requantize with a coarser scale."""
    indexed = list(enumerate(rows))
    shared = [(i, row) for i, row in indexed if row.get("shared_scale")]
    own = [(i, row) for i, row in indexed if not row.get("shared_scale")]
    series = [(fmt, ".", own)]
    if shared:
        series = [(f"{fmt}: own scale", ".", own),
                  (f"{fmt}: fused q/k/v, gate/up: one shared scale, coarser for all but the largest part", "x",
                   shared)]
    return [s for s in series if s[2]]
