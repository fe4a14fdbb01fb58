"""quantpipe's presets against the methods users compare them with, on the bundled model: runs `quantpipe compare`
and writes its table, plot and command into bench/RESULTS.md (its own section, between markers; the rest of the
file is kept).

    python bench/compare.py [--recipes fp8,int8_sq] [--baselines gptq,nf4,llm-int8,ort-int8,ort-int4] [--set K=V ...]
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

from pipeline.compare import report

RESULTS = BENCH / "RESULTS.md"
OUT = BENCH / "compare"
GPTQ_NOTE = ("GPTQ runs through ModelOpt's `gptq` algorithm (INT4 weights, the int4_awq layout); GPTQModel 7.7.0 "
             "was not tried: it requires torch>=2.14.1 and this project pins torch 2.13.0.")
START, END = "<!-- compare: start -->", "<!-- compare: end -->"


def section(rows: list[dict], command: str, seconds: float) -> str:
    return "\n".join([
        START, "## Against other quantization libraries (`quantpipe compare`)", "",
        f"`{command}`: {seconds / 60:.0f} min on {platform.platform()}, 2 shared cores (absolute times are noisy).",
        "", report.markdown_table(rows), "", report.notes(rows), "",
        GPTQ_NOTE, "",
        f"![weight size against perplexity ratio](compare/{report.PLOT})", END,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp8,int8_sq")
    parser.add_argument("--baselines", default="gptq,nf4,llm-int8,ort-int8,ort-int4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    command = ["quantpipe", "compare", *args.recipes.split(","), *(f"--set={o}" for o in args.overrides),
               f"--baselines={args.baselines}", f"--out={OUT.relative_to(BENCH.parent)}"]
    started = time.time()
    subprocess.run([sys.executable, "-m", "pipeline", *command[1:]], check=True, cwd=BENCH.parent)
    rows = json.loads((OUT / report.REPORT_JSON).read_text())["rows"]
    put_section(RESULTS, START, END, section(rows, shlex.join(command), time.time() - started))


if __name__ == "__main__":
    main()
