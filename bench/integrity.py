"""The cost of checking content on use, side by side in one run, on the bundled model (issue: integrity):

    python bench/integrity.py [--recipe default] [--cache DIR]

Runs the recipe cold (or reuses DIR's cache), then measures: the fully cached rerun's wall time (it reads nothing,
so it checks nothing), and the time to re-hash every artifact a cold run reads as an input or publishes (what the
content checks add to a cold run), against the cold run's own time. Appends its table to bench/RESULTS.md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from pipeline.fmt import human_bytes  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402

SECTION = "## Content checked on use"


def quantpipe(*args: str) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", *args, "--json"], capture_output=True, text=True,
                          check=True)
    return time.perf_counter() - started, [json.loads(line) for line in proc.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="qp-integrity-"))
    engines = Path(tempfile.mkdtemp(prefix="qp-engines-"))
    common = [args.recipe, "--cache-dir", str(cache), "--engines-dir", str(engines)]
    cold, events = quantpipe(*common)
    end = events[-1]
    built = sum(s["seconds"] for s in end["stages"] if s["status"] == "built")
    rerun, _ = quantpipe(*common)
    store = ArtifactStore(cache)
    checked, seconds = 0, 0.0
    for stage in end["stages"]:  # every artifact is either read by a later stage or published (or both)
        started = time.perf_counter()
        assert store.get(stage["stage"], stage["key"], deep=True) is not None
        seconds += time.perf_counter() - started
        checked += stage["bytes"]
    rows = [
        ("fully cached rerun (reads nothing)", f"{rerun:.2f} s wall", "< 1 s"),
        ("re-hashing what a cold run reads and publishes", f"{human_bytes(checked)} in {seconds:.2f} s", ""),
        ("that cost / the stages' own time in the cold run",
         f"{seconds:.2f} s / {built:.1f} s = **{seconds / built:.2%}**", "<= 3%"),
    ]
    table = "\n".join([SECTION, "", f"`python bench/integrity.py --recipe {args.recipe}` (sha256, the manifest's hash; "
                       f"cold run {cold:.1f} s wall):", "", "| measure | value | goal |", "| --- | --- | --- |",
                       *(f"| {a} | {b} | {c} |" for a, b, c in rows), ""])
    results = BENCH / "RESULTS.md"
    before, _, after = results.read_text().partition(SECTION)
    rest = after[after.find("\n## ") + 1:] if "\n## " in after else ""  # the sections after this one stay
    results.write_text(before.rstrip() + "\n\n" + table + ("\n" + rest if rest else ""))
    print(table)


if __name__ == "__main__":
    main()
