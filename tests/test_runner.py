"""Runner mechanics on toy stages: keys, hits, misses, partial invalidation, forcing, plans and concurrency."""

import pytest

from pipeline import runner, runs
from pipeline.errors import BadInput, UnsupportedOnTarget
from pipeline.recipe import load_recipe
from pipeline.store import ArtifactStore
from tests.toy_stages import calls, run_concurrently, toy_chain


@pytest.fixture
def calls_file(tmp_path):
    return tmp_path / "calls.txt"


def test_first_run_builds_every_stage_and_second_run_builds_nothing(store, calls_file):
    recipe = load_recipe("fp8")
    first = runner.run(recipe, store, stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in first] == ["built", "built", "built"]
    second = runner.run(recipe, store, stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in second] == ["hit", "hit", "hit"]
    assert [o.key for o in first] == [o.key for o in second]
    assert calls(calls_file) == ["load", "calibrate", "export"]


def test_changing_a_calibration_field_reruns_calibrate_and_downstream_only(store, calls_file):
    runner.run(load_recipe("fp8"), store, stages=toy_chain(calls_file))
    changed = load_recipe("fp8", ["calibration.samples=64"])
    steps = runner.plan(changed, store, stages=toy_chain(calls_file))
    assert [s.hit for s in steps] == [True, False, False]
    assert steps[1].reasons == ["calibration.samples: 32 -> 64"]
    assert steps[2].reasons == ["input calibrate changed"]
    outcomes = runner.run(changed, store, stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in outcomes] == ["hit", "built", "built"]
    assert calls(calls_file) == ["load", "calibrate", "export", "calibrate", "export"]


def test_changing_an_export_field_keeps_calibration(store, calls_file):
    runner.run(load_recipe("fp8"), store, stages=toy_chain(calls_file))
    outcomes = runner.run(load_recipe("fp8", ["export.tp=2"]), store, stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in outcomes] == ["hit", "hit", "built"]


def test_keys_depend_on_params_inputs_and_environment(store, monkeypatch):
    recipe = load_recipe("fp8")
    base = [s.key for s in runner.plan(recipe, store, stages=toy_chain())]
    assert base == [s.key for s in runner.plan(recipe, store, stages=toy_chain())]
    chain = toy_chain()
    monkeypatch.setattr(type(chain[0]), "environment", lambda self, r: {"pyyaml": "0.0-other"})
    moved = [s.key for s in runner.plan(recipe, store, stages=chain)]
    assert moved[0] != base[0] and moved[1] != base[1], "an upstream key change must move every downstream key"


def test_force_rebuilds_that_stage_and_everything_after(store, calls_file):
    recipe = load_recipe("fp8")
    runner.run(recipe, store, stages=toy_chain(calls_file))
    outcomes = runner.run(recipe, store, force=["calibrate"], stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in outcomes] == ["hit", "built", "built"]


def test_until_stops_after_the_named_stage(store):
    outcomes = runner.run(load_recipe("fp8"), store, until="calibrate", stages=toy_chain()).outcomes
    assert [o.stage for o in outcomes] == ["load", "calibrate"]
    with pytest.raises(BadInput, match="unknown stage 'verfy'"):
        runner.plan(load_recipe("fp8"), store, until="verfy", stages=toy_chain())


def test_damaged_artifact_is_rebuilt_not_used(store, calls_file, caplog):
    recipe = load_recipe("fp8")
    first = runner.run(recipe, store, stages=toy_chain(calls_file)).outcomes
    victim = first[1].artifact / "out.txt"
    original = victim.read_bytes()
    data = bytearray(original)
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    outcomes = runner.run(recipe, store, stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in outcomes] == ["hit", "built", "hit"]
    assert (outcomes[1].artifact / "out.txt").read_bytes() == original
    assert "damaged artifact calibrate" in caplog.text


def test_unsupported_recipe_fails_before_any_stage_runs(store, calls_file):
    with pytest.raises(UnsupportedOnTarget, match="does not run on ada"):
        runner.run(load_recipe("nvfp4", ["target.gpu=ada"]), store, stages=toy_chain(calls_file))
    assert calls(calls_file) == []
    assert list(store.artifacts()) == []
    record = runs.latest(store, "nvfp4")  # refused runs are recorded too, for schedulers
    assert (record["ok"], record["exit_code"], record["failed_stage"]) == (False, 3, None)
    assert "does not run on ada" in record["error"]


class Crash(RuntimeError):
    pass


def test_a_crash_inside_a_stage_leaves_a_run_record_naming_the_stage(store, calls_file):
    chain = toy_chain(calls_file)
    chain[1].fail_with = Crash("boom")
    with pytest.raises(Crash):
        runner.run(load_recipe("fp8"), store, stages=chain)
    record = runs.latest(store, "fp8")
    assert (record["ok"], record["exit_code"], record["failed_stage"]) == (False, 1, "calibrate")
    assert record["error"] == "Crash: boom"
    assert [o["stage"] for o in record["outcomes"]] == ["load"]


def test_a_miss_names_the_field_that_differs_from_an_artifact_another_recipe_made(store, calls_file):
    runner.run(load_recipe("fp8"), store, stages=toy_chain(calls_file))
    other = load_recipe("int8_sq", ["name=someone-else", "quantization.format=fp8", "calibration.samples=8"])
    steps = {s.stage.name: s for s in runner.plan(other, store, stages=toy_chain(calls_file))}
    [reason] = steps["calibrate"].reasons
    assert reason.startswith("calibration.samples: 32 -> 8 (vs cached ") and reason.endswith(" of recipe fp8)")


def test_presets_that_describe_the_same_work_share_every_artifact(store, calls_file):
    runner.run(load_recipe("default"), store, stages=toy_chain(calls_file))
    assert all(step.hit for step in runner.plan(load_recipe("fp8"), store, stages=toy_chain(calls_file)))


def _run_in_process(cache, calls_file):
    runner.run(load_recipe("fp8"), ArtifactStore(cache), stages=toy_chain(calls_file, delay=0.5))


def test_concurrent_identical_runs_build_each_stage_once(store, calls_file):
    assert run_concurrently(_run_in_process, [(store.root, calls_file)] * 2) == [0, 0]
    assert sorted(calls(calls_file)) == ["calibrate", "export", "load"]


def test_each_built_artifact_records_the_peak_memory_its_stage_reached(store, calls_file):
    """Measured by the OS per stage (the high-water mark is reset before each), not the process's lifetime peak."""
    chain = toy_chain(calls_file)
    chain[1].allocate = 400 << 20  # calibrate holds 400 MiB for a moment; export after it holds nothing extra
    outcomes = {o.stage: o.to_json() for o in runner.run(load_recipe("fp8"), store, stages=chain).outcomes}
    assert outcomes["calibrate"]["peak_rss_bytes"] > 400 << 20
    assert outcomes["export"]["peak_rss_bytes"] < outcomes["calibrate"]["peak_rss_bytes"] - (300 << 20)
    manifest = store.get("calibrate", outcomes["calibrate"]["key"]).manifest
    assert manifest["peak_rss_bytes"] == outcomes["calibrate"]["peak_rss_bytes"]
