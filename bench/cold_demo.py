"""Issue 17's cold-run goal: the `make demo` pipeline (`quantpipe run default`, no venv setup) from an empty cache,
this checkout against a baseline commit (default 8720c75) checked out into a temporary `git worktree`, run side by
side in one benchmark (alternating, so both see the same machine load), each with the same venv interpreter.

    python bench/cold_demo.py [--baseline 8720c75] [--rounds 1] [--set KEY=VALUE ...]

Reports wall seconds and peak RSS (GNU time) of each run and the ratio this/baseline (goal <= 0.5), and appends a
section to bench/RESULTS.md. The worktree is removed at the end.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from results import append


def cold_run(checkout: Path, overrides: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of `python -m pipeline run default` in `checkout`, empty cache and
    engines folder."""
    with tempfile.TemporaryDirectory(prefix="quantpipe-cold-") as cache:
        command = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "pipeline", "run", "default",
                   *[arg for item in overrides for arg in ("--set", item)], "--cache-dir", cache,
                   "--engines-dir", str(Path(cache) / "engines")]  # publishing stays out of the checkouts
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
    peak = int(proc.stderr.strip().splitlines()[-1]) * 1024 if proc.stderr.strip() else 0
    return seconds, peak, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="8720c75")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    options = parser.parse_args()
    worktree = Path(tempfile.mkdtemp(prefix="quantpipe-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), options.baseline],
                   check=True, capture_output=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    runs = {"baseline": [], "this": []}
    try:
        for _ in range(options.rounds):
            runs["baseline"].append(cold_run(worktree, options.overrides))
            runs["this"].append(cold_run(ROOT, options.overrides))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True, check=False)
    best = {name: min(r[0] for r in rows) for name, rows in runs.items()}
    lines = [f"## Cold `make demo` pipeline against {options.baseline} ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/cold_demo.py {' '.join(sys.argv[1:])}` on {platform.platform()}, {os.cpu_count()} "
             f"shared cores; this = {head}. Fastest of {options.rounds} alternating round(s). Goal: this <= 0.5x.", "",
             "| checkout | seconds (each round) | peak RSS (each round) | exit codes |", "| --- | --- | --- | --- |"]
    for name, rows in runs.items():
        lines.append(f"| {name} | {', '.join(f'{r[0]:.0f}' for r in rows)} | "
                     f"{', '.join(f'{r[1] / 2**30:.2f} GiB' for r in rows)} | {', '.join(str(r[2]) for r in rows)} |")
    lines += ["", f"Ratio this/baseline: {best['this'] / best['baseline']:.2f} (goal <= 0.5)."]
    append(options.results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
