"""Typed artifact facts and the one key record, on toy stages: facts are checked when a stage makes them and whenever
its artifact is read; keys come from one KeyRecord that manifests and run records store; parts are reused by the
runner."""

import json
import logging

import pytest

from pipeline import runner, runs
from pipeline.files import write_json_atomic
from pipeline.keys import KeyRecord
from pipeline.recipe import load_recipe
from pipeline.store import MANIFEST, ArtifactStore, FactsMismatch
from tests.toy_stages import ToyCalibrate, ToyFacts, ToyLoad, TypedToyExport, calls


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "cache")


def typed_chain(calls_file=None):
    chain = (ToyLoad(), ToyCalibrate(), TypedToyExport())
    for stage in chain:
        stage.calls_file = calls_file
    return chain


def test_facts_come_back_typed_when_built_and_when_read(store):
    recipe = load_recipe("fp8")
    built = runner.run(recipe, store, stages=typed_chain()).outcomes[-1]
    hit = runner.run(recipe, store, stages=typed_chain()).outcomes[-1]
    assert (built.status, hit.status) == ("built", "hit")
    assert built.artifact.facts == hit.artifact.facts == ToyFacts(n=1)
    assert hit.artifact.manifest["metadata"] == {"n": 1}, "the manifest holds the facts' JSON form"


def test_metadata_that_does_not_fit_the_stage_facts_is_refused_and_nothing_is_stored(store):
    chain = typed_chain()
    chain[-1].produce = {"n": "many"}
    with pytest.raises(FactsMismatch, match="export stage returned metadata that does not fit its facts: n:"):
        runner.run(load_recipe("fp8"), store, stages=chain)
    assert [a.stage for a in store.artifacts()] == ["calibrate", "load"]
    assert runs.latest(store, "fp8")["exit_code"] == 1, "a stage breaking its own contract is a bug"


@pytest.mark.parametrize("metadata", [{"n": "many"}, {"n": 1, "older_field": True}, {}])
def test_a_stored_artifact_whose_metadata_does_not_fit_is_rebuilt_with_one_warning(store, tmp_path, caplog,
                                                                                   metadata):
    """A torn or hand-edited manifest, or one written by a stage version with another shape of facts."""
    recipe, calls_file = load_recipe("fp8"), tmp_path / "calls.txt"
    export = runner.run(recipe, store, stages=typed_chain(calls_file)).outcomes[-1].artifact
    write_json_atomic(export / MANIFEST, {**export.manifest, "metadata": metadata})
    step = runner.plan(recipe, store, stages=typed_chain(calls_file))[-1]
    assert not step.hit and step.reasons == ["artifact missing or damaged"]
    with caplog.at_level(logging.WARNING, logger="pipeline.store"):
        outcomes = runner.run(recipe, store, stages=typed_chain(calls_file)).outcomes
    assert [o.status for o in outcomes] == ["hit", "hit", "built"]
    assert outcomes[-1].artifact.facts == ToyFacts(n=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "metadata does not fit its facts" in warnings[0]
    assert calls(calls_file) == ["load", "calibrate", "export", "export"]


def test_a_key_is_recomputed_from_its_manifest_and_from_the_run_record(store):
    result = runner.run(load_recipe("fp8"), store, stages=typed_chain())
    record = json.loads(result.record.read_text())
    for outcome in result.outcomes:
        manifest = outcome.artifact.manifest
        assert KeyRecord.from_json(outcome.stage, manifest).key() == outcome.key == manifest["key"]
        assert KeyRecord.from_json(outcome.stage, record["stages"][outcome.stage]).key() == outcome.key


def test_key_record_encoding_is_stable():
    """The encoding every cached key was made with (the old runner.stage_key gives the same hash): changing it
    would rebuild every cache without a version bump saying why."""
    record = KeyRecord("calibrate", "1", "c0de", {"calibration": {"samples": 32}, "data": "d1"}, {"load": "k"},
                       {"torch": "2.13.0"})
    assert record.key() == "e52d01b7672de50baf1da5ba0d124963cf3bb81bb9b539c6f7195c983289bf01"
    part = record.part("trtllm", {"format": "trtllm", "tp": 2})
    assert part.key() != record.key() and (part.inputs, part.code) == (record.inputs, record.code)


def test_adding_a_part_links_the_part_an_earlier_artifact_made(store, tmp_path):
    calls_file = tmp_path / "calls.txt"
    first = runner.run(load_recipe("fp8", ["export.formats=[hf]"]), store, stages=typed_chain(calls_file))
    more = runner.run(load_recipe("fp8", ["export.formats=[hf,onnx]"]), store, stages=typed_chain(calls_file))
    before, after = first.outcomes[-1].artifact, more.outcomes[-1].artifact
    assert after.key != before.key and after.manifest["reused_parts"] == ["hf"]
    assert after.manifest["parts"]["hf"] == before.manifest["parts"]["hf"]
    assert (after / "hf" / "weights.bin").stat().st_ino == (before / "hf" / "weights.bin").stat().st_ino
    assert (after / "onnx" / "weights.bin").read_text() == "onnx"
    other_input = runner.run(load_recipe("fp8", ["export.formats=[hf]", "calibration.samples=8"]), store,
                             stages=typed_chain(calls_file)).outcomes[-1].artifact
    assert other_input.manifest["reused_parts"] == [], "a part is reused only from the same inputs"
    assert other_input.manifest["parts"]["hf"] != before.manifest["parts"]["hf"]
