"""Backends describe themselves: a toy backend added in one file (tests/toy_backend.py) is picked up by the recipe,
the targets check, the plan, the runner and the Ray executor without any list naming it."""

import json

import pytest

from pipeline import backends, ray_executor, runner, targets
from pipeline.backends import builders, registry
from pipeline.errors import UnsupportedOnTarget
from pipeline.matrix import MatrixSpec
from pipeline.recipe import load_recipe
from pipeline.stages.build import Build
from pipeline.store import ArtifactStore
from tests.toy_backend import ToyBuilder
from tests.toy_stages import toy_chain


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    """The toy backend registered for one test (the registries are restored afterwards)."""
    monkeypatch.setattr(backends, "_INFOS", dict(backends._INFOS))
    monkeypatch.setattr(builders, "_ADDED", {})
    return builders.register(ToyBuilder())


def test_the_registry_and_the_targets_check_pick_up_the_toy_backend(toy):
    assert registry()["toy"] is toy.info
    assert targets.check("hopper", "fp8", "none", "toy").sm == 90
    assert "toy" in {r["sm"]: r for r in targets.matrix()}["sm_90"]["backends"]
    with pytest.raises(UnsupportedOnTarget, match="build.backend 'toy' does not run on ada"):
        targets.check("ada", "fp8", "none", "toy")


def test_a_format_refusing_the_backends_export_refuses_the_backend():
    with pytest.raises(UnsupportedOnTarget, match="build.backend 'tensorrt-rtx' cannot build quantization.format "
                                                  "'mxfp8' \\(the ONNX export has no MXFP8 path"):
        targets.check("blackwell-rtx", "mxfp8", "none", "tensorrt-rtx")


def test_the_recipe_resolves_auto_and_the_export_from_the_description():
    recipe = load_recipe("fp8", ["target=hopper", "build.backend=auto"])
    assert recipe.build.backend == "toy"  # the one backend that builds for Hopper without a GPU
    assert recipe.export.formats == ("hf",)  # what the toy builds from
    assert load_recipe("fp8", ["target=ada"]).build.backend == "tensorrt-rtx"


def test_the_plan_and_the_runner_build_with_the_toy_backend(tmp_path):
    recipe = load_recipe("fp8", ["target=hopper", "build.backend=toy"])
    store = ArtifactStore(tmp_path / "cache")
    stages = (*toy_chain(tmp_path / "calls.txt"), Build())
    assert [s.stage.name for s in runner.plan(recipe, store, stages=stages)] == ["load", "calibrate", "export",
                                                                                "build"]
    built = runner.run(recipe, store, stages=stages).outcomes[-1]
    assert built.stage == "build" and built.artifact.metadata["backend"] == "toy"
    assert json.loads((built.artifact / "toy.json").read_text())["gpu"] == "sm_90"


def test_the_ray_executor_asks_the_description_whether_a_build_needs_a_gpu():
    spec = MatrixSpec()
    toy = ray_executor.resources(Build(), load_recipe("fp8", ["target=hopper", "build.backend=toy"]), spec)
    trtllm = ray_executor.resources(Build(), load_recipe("fp8", ["target=hopper", "build.backend=trtllm"]), spec)
    assert "num_gpus" not in toy
    assert trtllm["num_gpus"] == 1 and trtllm["resources"] == {"sm_90": 1}
