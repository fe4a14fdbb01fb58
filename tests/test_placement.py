"""Placement: the device plan is made and shown before any weight is read, disk offload calibrates (layer by layer)
to the same scales as a resident model, and impossible placements stop before any work with one line."""

import shutil
import subprocess
import sys

import pytest

from pipeline import host, placement, runner
from pipeline.errors import BadInput, HostLacks
from pipeline.recipe import ModelSpec, load_recipe
from pipeline.store import ArtifactStore
from tests.tiny_llama import SETTINGS, recipe_args, tiny_llama  # noqa: F401


def recipe(folder, *overrides):
    return load_recipe("fp8", [f"model.source={folder}", *SETTINGS, *overrides])


def test_the_plan_spills_layers_to_disk_when_cpu_memory_is_capped(tiny_llama):  # noqa: F811
    resident = placement.plan(tiny_llama, ModelSpec(device="cpu"))
    assert resident.describe() == "6 layers: 6 on cpu; 0 on disk" and not resident.spills
    capped = placement.plan(tiny_llama, ModelSpec(device="cpu", max_memory={"cpu": "600KB"}))
    assert capped.layers["disk"] > 0 and capped.spills
    assert capped.describe() == f"6 layers: {capped.layers.get('cpu', 0)} on cpu; {capped.layers['disk']} on disk"


def test_a_disk_offloaded_model_calibrates_layer_by_layer_to_the_same_scales(tiny_llama, tmp_path):  # noqa: F811
    store = ArtifactStore(tmp_path / "cache")
    resident = runner.run(recipe(tiny_llama, "calibration.layerwise=off"), store, until="calibrate").outcomes[-1]
    offloaded = runner.run(recipe(tiny_llama, "model.max_memory={cpu: 150KB}"), store, until="calibrate").outcomes
    assert offloaded[0].status == "hit", "placement is not part of what load makes"
    calibrated = offloaded[-1].artifact
    assert calibrated.metadata["placement"]["layers"] == {"disk": 6}
    assert calibrated.metadata["layerwise"], "auto calibrates layer by layer when the weights do not fit"
    assert (calibrated.manifest["files"]["calibration.safetensors"]["sha256"]
            == resident.artifact.manifest["files"]["calibration.safetensors"]["sha256"])
    assert not any((store.root / "calibrate").glob(".scratch-*")), "the offloaded weights went with the scratch"


@pytest.mark.skipif(bool(host.gpus()), reason="this host has a GPU")
def test_device_cuda_without_a_gpu_exits_4_before_any_work(tiny_llama, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "fp8",
                             *recipe_args(tiny_llama, "model.device=cuda"), "--cache-dir", str(cache)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 4, result.stderr
    assert "model.device is cuda but this host has no NVIDIA GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (cache / "load").exists(), "nothing was loaded"


def test_max_memory_naming_a_gpu_the_host_lacks_is_refused_before_any_work(tiny_llama, tmp_path):  # noqa: F811
    store = ArtifactStore(tmp_path / "cache")
    missing = f"cuda:{len(host.gpus())}"
    with pytest.raises(BadInput, match=f"names {missing} but this host has {len(host.gpus())} GPU"):
        runner.run(recipe(tiny_llama, f"model.max_memory={{{missing}: 1GiB}}"), store, until="calibrate")
    assert not list(store.artifacts())


@pytest.mark.parametrize("limits", ["{gpu0: 1GiB}", "{cpu: plenty}"])
def test_malformed_max_memory_is_a_one_line_recipe_error(limits):
    with pytest.raises(BadInput, match="model.max_memory"):
        load_recipe("fp8", [f"model.max_memory={limits}"])


def test_an_offload_dir_that_cannot_be_written_is_refused_before_any_work(tiny_llama, tmp_path):  # noqa: F811
    store = ArtifactStore(tmp_path / "cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(BadInput, match="model.offload_dir .* is not writable"):
        runner.run(recipe(tiny_llama, f"model.offload_dir={blocker}/offload"), store, until="calibrate")
    assert not list(store.artifacts())


def test_an_offload_dir_on_a_full_disk_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    store = ArtifactStore(tmp_path / "cache")
    full = shutil.disk_usage(tmp_path)._replace(free=1024)
    monkeypatch.setattr(placement.shutil, "disk_usage", lambda path: full)
    with pytest.raises(HostLacks, match="model.offload_dir .* free"):
        runner.run(recipe(tiny_llama, f"model.offload_dir={tmp_path}/offload"), store, until="calibrate")
    assert not list(store.artifacts())
