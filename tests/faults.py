"""Kill-and-resume trials: start a run, SIGKILL it while a chosen stage is writing, rerun, and compare every
artifact with an uninterrupted run. Used by the fault tests (a few trials) and bench/faults.py (many)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.store import TMP_PREFIX, ArtifactStore


@dataclass
class Trial:
    stage: str
    delay: float
    killed: bool  # False when the stage finished before the kill landed
    resumed: bool  # the rerun exited 0
    identical: bool  # every artifact's files equal the uninterrupted run's
    leftovers_read: int  # temporaries that ended up inside a real artifact (must be 0)


def fingerprint(store: ArtifactStore) -> dict[str, dict[str, str]]:
    """stage/key -> {file: sha256}, as the manifests record them."""
    return {f"{a.stage}/{a.key}": {n: f["sha256"] for n, f in a.manifest.get("files", {}).items()}
            for a in store.artifacts()}


def quantpipe(args: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", *args, "--cache-dir", str(cache), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_during(stage: str, delay: float, args: list[str], cache: Path, timeout: float = 900) -> bool:
    """Run, wait until `stage` starts writing (its temporary directory appears), wait `delay`, SIGKILL."""
    proc = quantpipe(args, cache)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if any((cache / stage).glob(f"{TMP_PREFIX}*")):
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            return False
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return False


def trial(stage: str, delay: float, args: list[str], cache: Path, baseline: dict) -> Trial:
    killed = kill_during(stage, delay, args, cache)
    rerun = quantpipe(args, cache)
    _, stderr = rerun.communicate(timeout=1800)
    current = fingerprint(ArtifactStore(cache))
    leftovers = sum(TMP_PREFIX in name for files in current.values() for name in files)
    identical = all(current.get(k) == v for k, v in baseline.items())
    return Trial(stage, round(delay, 2), killed, rerun.returncode == 0, identical, leftovers)


def random_trials(stages: list[str], count: int, max_delay: float, seed: int = 0) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    return [(stages[i % len(stages)], rng.uniform(0, max_delay)) for i in range(count)]


def seed_store(baseline: Path, target: Path, stages: set[str]) -> None:
    """A fresh store holding the baseline's artifacts of `stages` (hard links), so a trial starts at its stage."""
    for stage in stages:
        for path in (baseline / stage).rglob("*") if (baseline / stage).is_dir() else []:
            if TMP_PREFIX in str(path.relative_to(baseline)):
                continue
            destination = target / path.relative_to(baseline)
            if path.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, destination)
