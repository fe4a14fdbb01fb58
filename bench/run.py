"""quantpipe against bare ModelOpt, side by side in one run; writes bench/RESULTS.md and bench/results.json.

    python bench/run.py [--samples 16] [--seq-len 256] [--formats fp8,int8_sq,...] [--sections core,quality,engines]

Sections: core (overhead, no-op, reuse, memory), quality (per format, against ModelOpt's default recipe), engines
(TensorRT-RTX engine size and build time per format and target against the fp16 engine, and the rebuild).
A run of some sections keeps the others' last results in bench/results.json.

Absolute times on shared machines are noisy: the ratios, measured in the same run, are what count.
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

from pipeline.fmt import human_bytes  # noqa: E402

STAGES = ["load", "calibrate", "quantize", "export"]
IMPORTS = "import torch, transformers, safetensors, modelopt.torch.quantization, modelopt.torch.opt, pipeline.quant"
FORMATS = ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")  # presets, named like their formats


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of a command run in its own process (exit 5, a verification miss, is a result)."""
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - started, proc.stdout


def quantpipe(*args: str, cache: Path) -> list[str]:
    publish = ["--engines-dir", str(cache / "engines")] if args[0] == "run" else []
    return [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(cache), *publish]


def peak_rss(command: list[str]) -> int:
    """Peak RSS of one child, via /usr/bin/time when present (getrusage keeps the max over all children)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    return int(proc.stderr.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--sections", default="core,quality,engines")
    options = parser.parse_args()
    sections = set(options.sections.split(","))
    # The same work as the bare script: calibration and both checkpoints (no ONNX, no engine).
    calib = ["--set", f"calibration.samples={options.samples}", "--set", f"calibration.seq_len={options.seq_len}"]
    checkpoints = [*calib, "--set", "export.formats=[trtllm,hf]", "--set", "build.backend=none"]
    try:
        results = json.loads((BENCH / "results.json").read_text())
    except (OSError, ValueError):
        results = {}
    results.update({"machine": f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "calibration": f"{options.samples} x {options.seq_len} tokens"})
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if "core" in sections:
            results.update(core(root, checkpoints, options))
        if "quality" in sections:
            results["quality"] = quality(root, checkpoints, options)
        if "engines" in sections:
            results["engines"] = engines(root, calib)
    (BENCH / "results.json").write_text(json.dumps(results, indent=2))
    (BENCH / "RESULTS.md").write_text(render(results))
    print(render(results))


def core(root: Path, calib: list[str], options) -> dict:
    results = {}
    # Overhead: the cold pipeline and the bare script, same model, recipe and data.
    cold, _ = timed(quantpipe("run", "fp8", *calib, "--until", "export", "-q", cache=root / "a"))
    bare, _ = timed([sys.executable, str(BENCH / "bare_modelopt.py"), "fp8", str(root / "bare"),
                     str(options.samples), str(options.seq_len)])
    results["overhead"] = {"quantpipe_s": round(cold, 1), "bare_modelopt_s": round(bare, 1),
                           "ratio": round(cold / bare, 3), "goal": "<= 1.10"}
    # No-op: everything cached.
    noop, out = timed(quantpipe("run", "fp8", *calib, "--until", "export", "--json", cache=root / "a"))
    plan, _ = timed(quantpipe("plan", "fp8", *calib, cache=root / "a"))
    results["noop"] = {"wall_s": round(noop, 2), "pipeline_s": last_event(out)["seconds"],
                       "fraction_of_cold": round(noop / cold, 4), "plan_s": round(plan, 2),
                       "goal": "< 1 s and < 1% of cold"}
    # Reuse: another export format, then another target, after the first run.
    first, _ = timed(quantpipe("run", "fp8", *calib, "--set", "export.formats=[trtllm]", "--until", "export",
                               "-q", cache=root / "b"))
    second_format, _ = timed(quantpipe("run", "fp8", *calib, "--set", "export.formats=[trtllm,hf]",
                                       "--until", "export", "-q", cache=root / "b"))
    second_target, _ = timed(quantpipe("run", "fp8", *calib, "--set", "export.formats=[trtllm,hf]",
                                       "--set", "target=hopper", "--until", "export", "-q", cache=root / "b"))
    results["reuse"] = {"first_s": round(first, 1), "second_format_s": round(second_format, 1),
                        "second_format_fraction": round(second_format / first, 3),
                        "second_target_s": round(second_target, 1),
                        "second_target_fraction": round(second_target / first, 3), "goal": "<= 0.15"}
    # Memory: each stage alone in its own process, against the fp32 weights; and beyond what importing torch,
    # transformers and ModelOpt costs any process (as large as this small model's weights).
    fp32 = 134.5e6 * 4
    imports = peak_rss([sys.executable, "-W", "ignore", "-c", IMPORTS])
    memory = {"imports only": {"peak_rss": imports, "ratio_to_fp32": round(imports / fp32, 2), "beyond_imports": 0}}
    runs = {stage: quantpipe("run", "fp8", *calib, "--until", stage, "-q", cache=root / "c") for stage in STAGES}
    runs["bare_modelopt"] = [sys.executable, str(BENCH / "bare_modelopt.py"), "fp8", str(root / "bare2"),
                             str(options.samples), str(options.seq_len)]
    for name, command in runs.items():
        rss = peak_rss(command)
        memory[name] = {"peak_rss": rss, "ratio_to_fp32": round(rss / fp32, 2),
                        "beyond_imports": round((rss - imports) / fp32, 2)}
    results["memory"] = memory
    return results


def last_event(stdout: str) -> dict:
    """The run_end line of `quantpipe run --json`."""
    return json.loads(stdout.strip().splitlines()[-1])


def stage_of(stdout: str, name: str) -> dict:
    return next(s for s in last_event(stdout)["stages"] if s["stage"] == name)


ENGINE_CELLS = (("fp8", "ada"), ("int8_sq", "ada"), ("int4_awq", "ada"), ("fp8", "blackwell-rtx"),
                ("nvfp4", "blackwell-rtx"))


def engines(root: Path, calib: list[str]) -> dict:
    """TensorRT-RTX engines per format and target, a rebuild of each, and the fp16 engine of the same model."""
    rows, load = {}, None
    for preset, target in ENGINE_CELLS:
        args = ["run", preset, "--set", f"target={target}", *calib, "--until", "build", "--json"]
        _, out = timed(quantpipe(*args, cache=root / "e"))
        build, load = stage_of(out, "build")["metadata"], stage_of(out, "load")["path"]
        _, again = timed(quantpipe(*args, "--force", "build", cache=root / "e"))
        rows[f"{preset}@{target}"] = {"engine_bytes": build["engine_bytes"], "build_s": build["build_seconds"],
                                      "rebuild_s": stage_of(again, "build")["metadata"]["build_seconds"],
                                      "sm": build["compute_capability"]}
    for sm in (89, 120):
        _, out = timed([sys.executable, str(BENCH / "fp16_engine.py"), load, str(sm), str(root / "fp16")])
        fp16 = json.loads(out.strip().splitlines()[-1])
        rows[f"fp16@sm_{sm}"] = {"engine_bytes": fp16["engine_bytes"], "build_s": fp16["build_seconds"],
                                 "rebuild_s": None, "sm": fp16["compute_capability"]}
    return rows


def quality(root: Path, calib: list[str], options) -> dict:
    rows = {}
    for preset in options.formats.split(","):
        _, out = timed(quantpipe("run", preset, *calib, "--json", cache=root / "q"))
        verify = stage_of(out, "verify")["metadata"]
        _, bare_out = timed([sys.executable, str(BENCH / "bare_modelopt.py"), preset,
                             str(root / f"bare-{preset}"), str(options.samples), str(options.seq_len), "--ppl"])
        bare = json.loads(bare_out.strip().splitlines()[-1])
        rows[preset] = {"ppl_ratio": verify["metrics"]["ppl_ratio"], "agreement": verify["agreement"],
                        "passed": verify["passed"], "sizes": verify["sizes"], "fp16_bytes": verify["fp16_bytes"],
                        "ppl_quantpipe": verify["ppl_quantized"], "ppl_original": verify["ppl_original"],
                        "ppl_bare_default": bare.get("ppl"), "bare_errors": {k: v for k, v in bare.items()
                                                                             if k.endswith("error")}}
    return rows


def render(r: dict) -> str:
    header = ["# Benchmarks", "", f"Machine: {r['machine']}. Calibration: {r['calibration']}, FP8 unless noted.",
              "Regenerate with `make bench` (or `python bench/run.py --sections engines` for one section)."]
    return "\n".join([*header, *render_core(r), *render_quality(r), *render_engines(r)]) + "\n"


def render_core(r: dict) -> list[str]:
    if "overhead" not in r:
        return []
    o, n, u = r["overhead"], r["noop"], r["reuse"]
    lines = ["", "| measure | value | goal |", "| --- | --- | --- |",
             f"| cold pipeline / bare ModelOpt script | {o['quantpipe_s']} s / {o['bare_modelopt_s']} s = "
             f"**{o['ratio']}** | {o['goal']} |",
             f"| fully cached rerun | {n['wall_s']} s wall ({n['pipeline_s']} s pipeline work), "
             f"**{n['fraction_of_cold']:.2%}** of cold | {n['goal']} |",
             f"| `quantpipe plan` | {n['plan_s']} s | < 1 s |",
             f"| second export format after the first run | {u['second_format_s']} s = "
             f"**{u['second_format_fraction']:.0%}** of the first | {u['goal']} |",
             f"| second target after the first run | {u['second_target_s']} s = "
             f"**{u['second_target_fraction']:.0%}** of the first | {u['goal']} |", ""]
    lines += ["## Peak memory per stage (each in its own process)", "",
              "| stage | peak RSS | / fp32 weights | beyond the library imports / fp32 weights |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {human_bytes(v['peak_rss'])} | {v['ratio_to_fp32']} | {v.get('beyond_imports', '')} |"
              for k, v in r["memory"].items()]
    return lines


def render_quality(r: dict) -> list[str]:
    lines = []
    if "quality" in r:
        lines += ["", "## Quality against the unquantized model and against ModelOpt's default recipe", "",
                  "| preset | ppl ratio | agreement | verify | ppl quantpipe | ppl bare ModelOpt default | size / fp16 "
                  "| bare ModelOpt errors |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for preset, q in r["quality"].items():
            size = max(q["sizes"].values()) / q["fp16_bytes"]
            bare = f"{q['ppl_bare_default']:.3f}" if q["ppl_bare_default"] else "n/a"
            errors = "; ".join(q["bare_errors"].values()) or ""
            lines.append(f"| {preset} | {q['ppl_ratio']:.4f} | {q['agreement']:.1%} | "
                         f"{'pass' if q['passed'] else 'FAIL'} | {q['ppl_quantpipe']:.3f} | {bare} | {size:.2f} | "
                         f"{errors} |")
    return lines


def render_engines(r: dict) -> list[str]:
    if "engines" not in r:
        return []
    fp16 = {row["sm"]: row["engine_bytes"] for name, row in r["engines"].items() if name.startswith("fp16@")}
    lines = ["", "## TensorRT-RTX engines (built here without a GPU) against the fp16 engine", "",
             "| engine | compute capability | size | / fp16 engine | build | rebuild (persisted caches) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in r["engines"].items():
        rebuild = f"{row['rebuild_s']} s" if row["rebuild_s"] is not None else ""
        lines.append(f"| {name} | {row['sm']} | {human_bytes(row['engine_bytes'])} | "
                     f"{row['engine_bytes'] / fp16[row['sm']]:.2f} | {row['build_s']} s | {rebuild} |")
    return lines


if __name__ == "__main__":
    main()
