"""Verification reports: report.json for machines, report.md for people, plot.png for a glance."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.fmt import human_bytes

REPORT_JSON, REPORT_MD, PLOT = "report.json", "report.md", "plot.png"


def write(out: Path, result: dict, layers: dict[str, list[dict]]) -> None:
    (out / REPORT_JSON).write_text(json.dumps({**result, "layers": layers}, indent=2))
    (out / REPORT_MD).write_text(markdown(result))
    plot(out / PLOT, result, layers)


def markdown(r: dict) -> str:
    t = r["thresholds"]
    lines = [
        f"# Verification: {r['format']} — {'PASSED' if r['passed'] else 'FAILED'}",
        "",
        "| check | value | threshold |",
        "| --- | --- | --- |",
        f"| perplexity (unquantized) | {r['ppl_original']:.3f} | |",
        f"| perplexity (quantized) | {r['ppl_quantized']:.3f} | |",
        f"| perplexity ratio | {r['ppl_ratio']:.4f} | <= {t['ppl_ratio_max']} |",
        f"| greedy generation agreement | {r['agreement']:.1%} | >= {t['agreement_min']:.0%} |",
    ]
    for fmt, e in r["exports"].items():
        if fmt == "onnx" and "onnxruntime" in e:
            lines.append(f"| onnx FP4 weights dequantized vs calibrated layers (max relative error); onnxruntime "
                         f"{e['onnxruntime']} | {e['max_layer_error']} | <= {e['tolerance']} |")
        elif fmt == "onnx":
            lines.append(f"| onnx in onnxruntime: top-1 agreement / cosine / ppl vs calibrated model | "
                         f"{e['agreement']:.1%} / {e['cosine']:.4f} / {e['ppl']:.3f} | >= {t['agreement_min']:.0%} |")
            lines.append(f"| onnx decode speed in onnxruntime on this host's CPU | {e['tokens_per_second']} tokens/s | |")
            lines.append(f"| onnx KV-cache decode steps matching a full recompute | {e['kv_cache_steps_match']:.0%} "
                         f"| 100% |")
        elif e["parity"]:
            lines.append(f"| {fmt} export logit cosine vs calibrated model | {e['parity']['cosine']:.5f} "
                         f"(max abs {e['parity']['max_abs_error']}) | >= {t['parity_cosine_min']} |")
        else:
            lines.append(f"| {fmt} export shards | {len(e['shards'])} rank files, checked for completeness | |")
        lines.append(f"| {fmt} export size | {human_bytes(r['sizes'][fmt])} "
                     f"({r['sizes'][fmt] / r['fp16_bytes']:.2f}x of fp16) | |")
    lines += ["", f"Evaluated on {r['eval_tokens']} held-out tokens. Engine: {r['engine']}.", ""]
    if r["failures"]:
        lines += ["## Failures", "", *(f"- {f}" for f in r["failures"]), ""]
    lines += ["## Generations", ""]
    for g in r["generations"]:
        lines += [f"**{g['prompt']}**", "", f"- unquantized: {g['original']!r}", f"- quantized: {g['quantized']!r}", ""]
    lines += ["![perplexity, size and per-layer error](plot.png)", ""]
    return "\n".join(lines)


def plot(path: Path, r: dict, layers: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = ["fp16", *r["sizes"]]
    sizes = [r["fp16_bytes"] / 1e6, *(b / 1e6 for b in r["sizes"].values())]
    left.bar(names, sizes, color=["grey", *["tab:blue"] * len(r["sizes"])])
    left.set_ylabel("MB")
    left.set_title(f"size; perplexity ratio {r['ppl_ratio']:.3f} (max {r['thresholds']['ppl_ratio_max']})")
    for fmt, rows in layers.items():
        right.plot([row["error"] for row in rows], marker=".", linestyle="none", label=fmt)
    right.set_xlabel("quantized layer (model order)")
    right.set_ylabel("relative weight error vs calibrated")
    right.set_title("per-layer export error")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
