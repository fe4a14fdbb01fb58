"""The comparison as one table (markdown, for report.md and bench/RESULTS.md) and one plot (weight size against
perplexity ratio, every measured row a labelled point), plus compare.json for machines."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.fmt import human_bytes

REPORT_JSON, REPORT_MD, PLOT = "compare.json", "report.md", "plot.png"
COLUMNS = ("row", "method", "runtime", "ppl ratio", "agreement", "size vs fp16", "weights", "quantize time",
           "CPU tokens/s")


def cells(row: dict) -> list[str]:
    """A row's table cells as text; a row without numbers says why."""
    if row["not_run"]:
        return [row["name"], row["method"], f"not run: {row['not_run']}", *[""] * (len(COLUMNS) - 3)]
    speed, seconds = row["tokens_per_second"], row["quantize_seconds"]
    return [row["name"], row["method"], row["runtime"], f"{row.get('ppl_ratio', 1.0):.3f}",
            f"{row.get('agreement', 1.0):.1%}", f"{row['size_vs_fp16']:.2f}x", human_bytes(row["weight_bytes"]),
            f"{seconds:.1f} s" if seconds is not None else "", f"{speed:.1f}" if speed is not None else "n/a (GPU deployment)"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def notes(rows: list[dict]) -> str:
    """What the numbers mean: one paragraph under the table."""
    reference = next(r for r in rows if r["name"] == "unquantized")
    return (f"Perplexity ratio and teacher-forced agreement against the unquantized model (perplexity "
            f"{reference['ppl']:.3f}) on the same {reference['eval_tokens']} held-out tokens. Sizes count unquantized "
            "floating-point weights at fp16, except ONNX Runtime's files, measured as written (its quantizers keep "
            "them fp32). Tokens/s: 32 greedy tokens on this CPU, in the runtime shown. ModelOpt rows (quantpipe's "
            "recipes, GPTQ) are fake-quantized in PyTorch here and deploy through TensorRT on a GPU. bitsandbytes "
            "quantizes while loading: its time includes the load.")


def markdown(rows: list[dict], command: str) -> str:
    return "\n".join(["# quantpipe compare", "", f"`{command}`", "", markdown_table(rows), "", notes(rows), "",
                      f"![weight size against perplexity ratio]({PLOT})", ""])


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["not_run"]:
            continue
        ours = row["method"].startswith("quantpipe") or row["name"] == "unquantized"
        x, y = row["size_vs_fp16"], row.get("ppl_ratio", 1.0)
        axes.scatter(x, y, marker="o" if ours else "s", color="tab:blue" if ours else "tab:orange")
        axes.annotate(row["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel("weight size vs fp16")
    axes.set_ylabel("perplexity ratio vs unquantized (lower is better)")
    axes.set_title("quantpipe (circles) and baselines (squares)")
    axes.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(out: Path, rows: list[dict], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    (out / REPORT_MD).write_text(markdown(rows, command))
    plot(out / PLOT, rows)
