"""Shared fixtures. The real SmolLM2 model is imported once per session into a store that all real-model tests
share (set QUANTPIPE_TEST_CACHE to keep it between sessions while developing)."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.recipe import load_recipe
from pipeline.store import ArtifactStore

# Small enough for CI on two cores, large enough that every algorithm sees real statistics.
TINY = [
    "calibration.samples=4",
    "calibration.seq_len=64",
    "verify.tokens=256",
    "verify.seq_len=128",
    "verify.max_new_tokens=8",
    "verify.prompts=['What is the capital of France?', 'Write one sentence about the ocean.']",
]


@pytest.fixture(scope="session", autouse=True)
def private_engines_dir(tmp_path_factory):
    """Nothing a test runs may publish into the checkout's engines/."""
    os.environ["QUANTPIPE_ENGINES"] = str(tmp_path_factory.mktemp("engines"))


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    """An empty store of the test's own."""
    return ArtifactStore(tmp_path / "cache")


@pytest.fixture(scope="session")
def real_store(tmp_path_factory) -> Iterator[ArtifactStore]:
    """Removed at the end of the session, pass or fail (gigabytes); QUANTPIPE_TEST_CACHE is kept."""
    root = os.environ.get("QUANTPIPE_TEST_CACHE")
    store = ArtifactStore(Path(root) if root else tmp_path_factory.mktemp("real-cache"))
    yield store
    if not root:
        shutil.rmtree(store.root, ignore_errors=True)


@pytest.fixture(scope="session")
def run_preset(real_store):
    """Run a preset with the tiny settings (plus overrides) through the real stages."""

    def run(preset: str, *overrides: str, until: str | None = "export", force=()):
        recipe = load_recipe(preset, [*TINY, *overrides])
        return runner.run(recipe, real_store, until=until, force=force)

    return run
