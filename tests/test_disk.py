"""A full disk and a read-only cache: one clear error, a stable exit code, no half artifact, a consistent store.
Uses small tmpfs mounts (needs root, as in CI here; skipped with the reason elsewhere)."""

import subprocess
import sys

import pytest

from pipeline.store import TMP_PREFIX, ArtifactStore


@pytest.fixture
def small_disk(tmp_path):
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=False)


def run(cache, *args):
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "fp8", "--until", "load", *args,
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_disk_full_while_writing_is_exit_4_with_nothing_half_written(small_disk):
    result = run(small_disk / "cache")
    assert result.returncode == 4, result.stderr
    progress, error = result.stderr.strip().splitlines()  # off a terminal: the stage's start line, then the error
    assert progress == "quantpipe: fp8: load: running (never built)" and "no space left" in error
    store = ArtifactStore(small_disk / "cache")
    assert list(store.artifacts()) == []
    assert list((small_disk / "cache").glob(f"*/{TMP_PREFIX}*")) == []


def test_read_only_cache_is_exit_2(small_disk):
    (small_disk / "cache").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run(small_disk / "cache")
    assert result.returncode == 2, result.stderr
    assert "is not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
