"""Layer-by-layer calibration: the same result as whole-model calibration, a kill -9 mid-layer resumes at that layer
to a byte-identical artifact, damaged or foreign layer checkpoints are never used, and gc sweeps orphans."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import layerwise, runner
from pipeline.errors import BadInput
from pipeline.recipe import load_recipe
from pipeline.store import SCRATCH_PREFIX, ArtifactStore, gc
from tests.tiny_llama import SETTINGS, recipe_args, tiny_llama  # noqa: F401


def calibrate(folder: Path, store: ArtifactStore, *overrides: str, until: str = "calibrate"):
    recipe = load_recipe("fp8", [f"model.source={folder}", *SETTINGS, *overrides])
    return {o.stage: o.artifact for o in runner.run(recipe, store, until=until).outcomes}


def files(artifact) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in artifact.manifest["files"].items()}


def test_layer_by_layer_and_whole_model_calibration_quantize_identically(tiny_llama, tmp_path):  # noqa: F811
    store = ArtifactStore(tmp_path / "cache")
    by_layer = calibrate(tiny_llama, store, "calibration.layerwise=on", until="quantize")
    whole = calibrate(tiny_llama, store, "calibration.layerwise=off", until="quantize")
    assert by_layer["calibrate"].metadata["layerwise"] and not whole["calibrate"].metadata["layerwise"]
    assert by_layer["calibrate"].key != whole["calibrate"].key
    for name in ("calibration.safetensors", "rescaled.json"):
        assert files(by_layer["calibrate"])[name] == files(whole["calibrate"])[name]
    assert files(by_layer["quantize"]) == files(whole["quantize"])
    assert not list(store.root.glob(f"calibrate/{SCRATCH_PREFIX}*")), "scratch is removed when the artifact commits"


def _ledger(cache: Path) -> dict:
    for path in cache.glob(f"calibrate/{SCRATCH_PREFIX}*/{layerwise.LEDGER}"):
        try:
            return json.loads(path.read_text())["layers"]
        except (OSError, ValueError):
            pass
    return {}


@pytest.mark.slow
def test_kill_mid_layer_resumes_at_that_layer_to_an_identical_artifact(tiny_llama, tmp_path):  # noqa: F811
    baseline = calibrate(tiny_llama, ArtifactStore(tmp_path / "baseline"), "calibration.layerwise=on")["calibrate"]
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "pipeline", "run", "fp8", *recipe_args(tiny_llama, "calibration.layerwise=on"),
               "--until", "calibrate", "--cache-dir", str(cache)]
    proc = subprocess.Popen([*command, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and len(_ledger(cache)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(_ledger(cache))
    assert 2 <= done < 6, f"the kill must land mid-stage ({done} of 6 layers done)"

    rerun = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    events = [json.loads(line) for line in rerun.stdout.splitlines()]
    layers = [e for e in events if e["event"] == "stage_progress" and "layer" in e]
    assert [e["layer"] for e in layers] == list(range(done + 1, 7)), "resumes at the layer it was on"
    assert all(e["resumed_at"] == done and e["elapsed_s"] >= 0 and e["remaining_s"] >= 0 for e in layers)
    assert layers[-1]["remaining_s"] == 0
    end = next(e for e in events if e["event"] == "stage_end" and e["stage"] == "calibrate")
    assert end["metadata"]["resumed_at_layer"] == done
    resumed = ArtifactStore(cache).get("calibrate", end["key"])
    assert files(resumed) == files(baseline), "byte-identical to an uninterrupted run"
    assert not list(cache.glob(f"calibrate/{SCRATCH_PREFIX}*"))


def _fake_checkpoints(scratch: Path, layers: int, done: int) -> layerwise.Checkpoints:
    """ModelOpt's checkpoint layout with `done` committed layers, hashed into the ledger."""
    checkpoints = layerwise.Checkpoints(scratch, layers, "max")
    checkpoints.resume()
    for index in range(done):
        folder = checkpoints.folder / f"layer_{index:04d}"
        folder.mkdir(parents=True)
        for name in ("quantizer_state.pt", "quantizer_buffers.pt", "output_meta.pt", "next_inputs.pt"):
            (folder / name).write_bytes(f"{name} {index}".encode())
        (checkpoints.folder / "manifest.json").write_text(json.dumps({"last_completed_layer": index}))
    assert checkpoints.finished() == list(range(done))
    return checkpoints


def test_a_damaged_layer_checkpoint_is_redone_from_that_layer(tmp_path):
    scratch = tmp_path / f"{SCRATCH_PREFIX}abc"
    _fake_checkpoints(scratch, layers=6, done=4)
    (scratch / "modelopt" / "layer_0002" / "next_inputs.pt").write_bytes(b"torn")
    again = layerwise.Checkpoints(scratch, 6, "max")
    assert again.resume() == 2
    assert sorted(p.name for p in (scratch / "modelopt").glob("layer_*")) == ["layer_0000", "layer_0001"]
    assert json.loads((scratch / "modelopt" / "manifest.json").read_text())["last_completed_layer"] == 1


def test_a_partial_layer_without_a_ledger_entry_is_redone(tmp_path):
    scratch = tmp_path / f"{SCRATCH_PREFIX}abc"
    checkpoints = _fake_checkpoints(scratch, layers=6, done=3)
    (checkpoints.folder / "layer_0003").mkdir()  # ModelOpt was writing layer 3 when the run was killed
    (checkpoints.folder / "layer_0003" / "quantizer_state.pt").write_bytes(b"half")
    assert layerwise.Checkpoints(scratch, 6, "max").resume() == 3
    assert not (checkpoints.folder / "layer_0003").exists()


def test_a_finished_calibration_redoes_only_its_last_layer(tmp_path):
    scratch = tmp_path / f"{SCRATCH_PREFIX}abc"
    _fake_checkpoints(scratch, layers=4, done=4)
    assert layerwise.Checkpoints(scratch, 4, "max").resume() == 3, "ModelOpt would start a finished one over"


def test_layer_checkpoints_of_another_calibration_are_refused(tmp_path):
    _fake_checkpoints(tmp_path / f"{SCRATCH_PREFIX}other", layers=4, done=2)
    mine = tmp_path / f"{SCRATCH_PREFIX}mine"
    os.rename(tmp_path / f"{SCRATCH_PREFIX}other", mine)
    with pytest.raises(BadInput, match="another calibration"):
        layerwise.Checkpoints(mine, 4, "max").resume()
    assert (mine / "modelopt" / "layer_0001").is_dir(), "nothing is deleted"


def test_gc_sweeps_orphaned_scratch_and_keeps_resumable_work(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    committed = store.scratch_for("calibrate", "a" * 64)
    resumable = store.scratch_for("calibrate", "b" * 64)
    abandoned = store.scratch_for("calibrate", "c" * 64)
    for scratch in (committed, resumable, abandoned):
        scratch.mkdir(parents=True)
    store.path_for("calibrate", "a" * 64).mkdir()  # killed after the commit, before the scratch was removed
    os.utime(abandoned, (time.time() - 30 * 86400,) * 2)
    gc(store, older_than_s=7 * 86400, max_bytes=None, keep=set())
    assert not committed.exists() and not abandoned.exists()
    assert resumable.exists(), "a fresh scratch area is what the next run resumes from"


def test_layerwise_auto_is_on_when_the_weights_spill_and_always_for_gptq():
    assert layerwise.wanted("auto", "max", spills=True) and not layerwise.wanted("auto", "max", spills=False)
    assert layerwise.wanted("auto", "gptq", spills=False), "gptq's layerwise result differs: never host-dependent"
    assert layerwise.wanted("on", "max", spills=False) and not layerwise.wanted("off", "max", spills=True)
    assert load_recipe("fp8", ["calibration.layerwise=on"]).calibration.layerwise == "on", "YAML's on is a bool"


class InterruptAtLayer(runner.Reporter):
    """Ctrl-C right after ModelOpt committed a layer: the scratch area keeps what a kill would leave."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def stage_progress(self, stage: str, event: dict) -> None:
        if event.get("layer") == self.layer:
            raise KeyboardInterrupt


def test_a_weight_changing_algorithm_resumes_to_an_identical_artifact(tiny_llama, tmp_path):  # noqa: F811
    """AWQ checkpoints whole layers (its rescaled weights), not just amax."""
    recipe = load_recipe("int4_awq", [f"model.source={tiny_llama}", *SETTINGS, "calibration.layerwise=on"])
    baseline = runner.run(recipe, ArtifactStore(tmp_path / "baseline"), until="calibrate").outcomes[-1].artifact
    store = ArtifactStore(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        runner.run(recipe, store, until="calibrate", reporter=InterruptAtLayer(3))
    resumed = runner.run(recipe, store, until="calibrate").outcomes[-1].artifact
    assert resumed.metadata["resumed_at_layer"] == 3
    assert files(resumed) == files(baseline)
