"""Fault-injection benchmark: >= 20 kill -9 trials at random points inside every stage, each followed by a rerun.

    python bench/faults.py [--trials 20] [--cache DIR]

Prints: trials, kills that landed, resumed correctly, corrupt artifacts used (must be 0).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages import NAMES  # noqa: E402
from pipeline.store import ArtifactStore  # noqa: E402
from tests.faults import fingerprint, random_trials, seed_store, trial  # noqa: E402

# Small calibration and evaluation, checkpoints only (no ONNX or engine), so 20 trials fit in minutes.
TINY = ["calibration.samples=4", "calibration.seq_len=64", "verify.tokens=256", "verify.seq_len=128",
        "verify.max_new_tokens=8", "export.formats=[trtllm,hf]", "build.backend=none"]
STAGES = ["load", "calibrate", "quantize", "export", "verify"]
# Rough length of each stage in this setting (seconds): kills land uniformly inside it.
DURATION = {"load": 25.0, "calibrate": 8.0, "quantize": 4.0, "export": 4.0, "verify": 30.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=None, help="baseline store (default: a temporary one)")
    options = parser.parse_args()
    args = ["fp8", *[a for item in TINY for a in ("--set", item)], "--until", "verify"]
    with tempfile.TemporaryDirectory() as scratch:
        baseline_root = options.cache or Path(scratch) / "baseline"
        subprocess.run([sys.executable, "-m", "pipeline", "run", *args, "--cache-dir", str(baseline_root), "-q"],
                       check=True)
        baseline = fingerprint(ArtifactStore(baseline_root))
        rows = []
        for i, (stage, fraction) in enumerate(random_trials(STAGES, options.trials, 1.0)):
            cache = Path(scratch) / f"trial{i}"
            seed_store(baseline_root, cache, set(NAMES[: NAMES.index(stage)]))
            rows.append(trial(stage, fraction * DURATION[stage], args, cache, baseline))
            r = rows[-1]
            print(f"trial {i:2d} {r.stage:<9} kill at +{r.delay:5.2f}s killed={r.killed!s:<5} "
                  f"resumed={r.resumed!s:<5} identical={r.identical!s:<5} leftovers_read={r.leftovers_read}",
                  flush=True)
    landed = [r for r in rows if r.killed]
    print(f"\ntrials: {len(rows)}  kills landed: {len(landed)}  resumed correctly: "
          f"{sum(r.resumed and r.identical for r in rows)}  corrupt artifacts used: "
          f"{sum(r.leftovers_read for r in rows) + sum(not r.identical for r in rows)}")


if __name__ == "__main__":
    main()
