"""Peak RSS of every stage (load, calibrate, quantize, export with ONNX, build with TensorRT-RTX, verify) on the
bundled model, each stage alone in its own process (earlier stages are cache hits there), for fp8 and nvfp4; as a
ratio to the fp32 weights, and beyond what importing the stages' libraries costs (measured in the same run).

    python bench/memory.py [--formats fp8,nvfp4] [--set calibration.samples=8 ...] [--cache-dir DIR]

Appends a section to bench/RESULTS.md with the command that made it. Goals (issue 17): every stage <= 2.5x the
fp32 weights and <= 1.5x beyond the imports.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from results import append  # noqa: E402 (bench/, the script's own folder)

from pipeline.fmt import human_bytes  # noqa: E402

STAGES = ("load", "calibrate", "quantize", "export", "build", "verify")
# Every library some stage imports: a stage's own cost is what it needs beyond these.
IMPORTS = ("import torch, transformers, safetensors, onnx, onnxruntime, onnx_graphsurgeon, tensorrt_rtx, "
           "modelopt.torch.quantization, modelopt.torch.opt, modelopt.onnx.export, pipeline.quant")
TARGETS = {"fp8": "ada", "nvfp4": "blackwell-rtx"}  # an RTX GPU of each format, so the engine is built
# Memory does not grow with the number of samples (one batch at a time): small settings keep the run short.
SMALL = ("calibration.samples=8", "calibration.seq_len=128", "verify.tokens=512", "verify.seq_len=128",
         "verify.max_new_tokens=8", "verify.prompts=['The capital of France is']")


def peak_rss(command: list[str]) -> tuple[int, float, str]:
    """Peak RSS (bytes) of a command and its children, its wall seconds and stdout (GNU time's %M)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 5):  # 5: verification missed a threshold, still a measurement
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr[-3000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) * 1024, seconds, proc.stdout


def stage_runs(fmt: str, overrides: list[str], cache: Path) -> dict[str, dict]:
    settings = [arg for item in [f"target={TARGETS[fmt]}", "build.backend=tensorrt-rtx", *overrides]
                for arg in ("--set", item)]
    rows = {}
    for stage in STAGES:
        command = [sys.executable, "-m", "pipeline", "run", fmt, *settings, "--until", stage, "--json",
                   "--cache-dir", str(cache)]
        rss, seconds, stdout = peak_rss(command)
        events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        ended = next(e for e in events if e.get("event") == "stage_end" and e["stage"] == stage)
        rows[stage] = {"peak_rss": rss, "stage_peak_rss": ended["peak_rss_bytes"], "status": ended["status"],
                       "seconds": round(seconds, 1), "metadata": ended["metadata"]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp8,nvfp4")
    parser.add_argument("--set", dest="overrides", action="append", default=list(SMALL))
    parser.add_argument("--cache-dir", type=Path, help="default: a fresh temporary cache (a cold run)")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    options = parser.parse_args()
    cache = options.cache_dir or Path(tempfile.mkdtemp(prefix="quantpipe-memory-"))
    imports, _, _ = peak_rss([sys.executable, "-W", "ignore", "-c", IMPORTS])
    runs = {fmt: stage_runs(fmt, options.overrides, cache) for fmt in options.formats.split(",")}
    load = next(iter(runs.values()))["load"]["metadata"]
    fp32 = load["parameters"] * 4
    lines = [f"## Peak RSS of every stage, each in its own process ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/memory.py {' '.join(sys.argv[1:])}` (settings: {', '.join(options.overrides)}) on "
             f"{platform.platform()}, {os.cpu_count()} shared cores. {load['name']}: fp32 weights "
             f"{human_bytes(fp32)}, stored {load['dtype']}; importing every stage's libraries alone peaks at "
             f"{human_bytes(imports)} ({imports / fp32:.2f}x). Peak RSS is the whole process (GNU time), its "
             "stage's own peak from the manifest beside it. Goals: <= 2.5x the fp32 weights, <= 1.5x beyond the "
             "imports.", "",
             "| format | stage | status | seconds | peak RSS | / fp32 weights | beyond imports / fp32 "
             "| manifest peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fmt, rows in runs.items():
        for stage, row in rows.items():
            rss = row["peak_rss"]
            lines.append(f"| {fmt} | {stage} | {row['status']} | {row['seconds']} | {human_bytes(rss)} | "
                         f"{rss / fp32:.2f} | {(rss - imports) / fp32:.2f} | {human_bytes(row['stage_peak_rss'])} |")
    append(options.results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
