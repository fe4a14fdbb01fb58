"""`quantpipe tune` against the FP8 preset on the bundled model: runs the search for Blackwell and writes its table,
plot and command into bench/RESULTS.md (its own section, between markers; the rest of the file is kept). The goal
(issue 15): an artifact meeting ppl ratio <= 1.05 smaller than the FP8 preset's.

    python bench/tune.py [--recipe nvfp4] [--max-ppl-ratio 1.05] [--formats fp8,nvfp4] [--exclude-steps none]
                         [--set K=V ...]

The search is an ordinary cached run per candidate: run it once under `timeout` as often as needed (each run
resumes), then this script, whose run is all cache hits.
"""

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from results import put_section  # noqa: E402 (bench/, the script's own folder)

from pipeline import tune

RESULTS = BENCH / "RESULTS.md"
OUT = BENCH / "tune"
START, END = "<!-- tune: start -->", "<!-- tune: end -->"


def goal(search: dict) -> str:
    """The chosen artifact against the FP8 candidate (the FP8 preset's quantization on the same settings)."""
    rows = {c["candidate"]: c for c in search["candidates"]}
    fp8, chosen = rows.get("fp8"), rows.get(search["chosen"])
    if chosen is None:
        return f"Nothing met {tune.Bar(**search['bar']).describe()}: no artifact chosen (exit 5)."
    budget = (chosen["quantization"].get("auto") or {}).get("effective_bits")
    verdict = ("smaller than" if chosen["bytes"] < fp8["bytes"] else "not smaller than") if fp8 else "vs"
    lines = [(f"Chosen: **{chosen['label']}**, {chosen['bytes'] / chosen['fp16_bytes']:.3f}x of fp16, "
              f"{chosen['bits']:.2f} bits per weight outside the embeddings and lm_head (scales included)"
              f"{f', AutoQuantize budget {budget} effective bits' if budget else ''}, ppl ratio "
              f"{chosen['ppl_ratio']:.3f}, agreement {chosen['agreement']:.1%}.")]
    if fp8:
        lines.append(f"Against the FP8 preset's quantization ({fp8['bytes'] / fp8['fp16_bytes']:.3f}x of fp16, "
                     f"{fp8['bits']:.2f} bits, ppl ratio {fp8['ppl_ratio']:.3f}): size ratio "
                     f"**{chosen['bytes'] / fp8['bytes']:.3f}**, {verdict} FP8.")
    return " ".join(lines)


def section(search: dict, command: str, seconds: float, code: int) -> str:
    return "\n".join([
        START, "## Smallest artifact meeting a quality bar (`quantpipe tune`)", "",
        (f"`{command}`: exit {code}, {seconds / 60:.1f} min for this (cached) run on {platform.platform()}, "
         "2 shared cores. Sizes are the unified HF checkpoint; bits are per weight outside the embeddings and lm_head, "
         "scales included."),
        "", *(line for line in (OUT / tune.REPORT_MD).read_text().splitlines() if line.startswith("|")), "",
        goal(search), "",
        f"![size against perplexity ratio](tune/{tune.PLOT})", END,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="nvfp4")
    parser.add_argument("--max-ppl-ratio", default="1.05")
    parser.add_argument("--formats", default="fp8,nvfp4")
    # Off by default here to fit the CPU time of a shared 2-core machine; the ladder is the path below FP8.
    parser.add_argument("--exclude-steps", default="none")
    parser.add_argument("--set", dest="overrides", action="append",
                        default=["target=blackwell", "quantization.kv_cache=none", "calibration.samples=16",
                                 "verify.tokens=512", "verify.max_new_tokens=8",
                                 "verify.prompts=['What is the capital of France?', 'List three prime numbers.']"],
                        metavar="KEY=VALUE")
    args = parser.parse_args()
    command = ["quantpipe", "tune", args.recipe, *(f"--set={o}" for o in args.overrides),
               f"--max-ppl-ratio={args.max_ppl_ratio}", f"--formats={args.formats}",
               f"--exclude-steps={args.exclude_steps}",
               f"--out={OUT.relative_to(BENCH.parent)}"]
    started = time.time()
    code = subprocess.run([sys.executable, "-m", "pipeline", *command[1:]], cwd=BENCH.parent, check=False).returncode
    if code not in (0, 5):
        sys.exit(code)
    search = json.loads((OUT / tune.TUNE_JSON).read_text())
    put_section(RESULTS, START, END, section(search, shlex.join(command), time.time() - started, code))


if __name__ == "__main__":
    main()
