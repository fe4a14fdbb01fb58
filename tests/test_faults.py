"""Kill -9 inside real stages, then resume: the rerun completes and every artifact equals an uninterrupted run's.
The fast subset; bench/faults.py runs the full randomised set."""

import pytest

from pipeline.stages import NAMES
from tests.conftest import TINY
from tests.faults import fingerprint, seed_store, trial

pytestmark = pytest.mark.slow
ARGS = ["fp8", *[a for item in TINY for a in ("--set", item)], "--until", "export"]


@pytest.mark.parametrize(("stage", "delay"), [("calibrate", 1.0), ("export", 0.5)])
def test_killed_stage_resumes_to_identical_artifacts(run_preset, real_store, tmp_path, stage, delay):
    produced = {f"{o.stage}/{o.key}" for o in run_preset("fp8", until="export").outcomes}
    expected = {k: v for k, v in fingerprint(real_store).items() if k in produced}
    cache = tmp_path / "cache"
    seed_store(real_store.root, cache, set(NAMES[: NAMES.index(stage)]))
    result = trial(stage, delay, ARGS, cache, expected)
    assert result.killed, "the kill must land while the stage is writing"
    assert result.resumed and result.identical and result.leftovers_read == 0, result
