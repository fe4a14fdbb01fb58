"""The artifact store: atomic publication, manifest checks, damage detection, locks and gc."""

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pipeline.errors import BadInput
from pipeline.store import MANIFEST, TMP_PREFIX, ArtifactStore, gc

KEY = "ab" * 32


def _write(store, key=KEY, content=b"payload"):
    def build(out):
        (out / "weights.bin").write_bytes(content)
        (out / "sub").mkdir()
        (out / "sub" / "note.txt").write_text("hello")
        return {"answer": 42}

    with store.lock("calibrate", key):
        return store.write("calibrate", key, build, {"params": {"x": 1}})


def test_written_artifact_has_a_readable_manifest_with_hashes(store):
    artifact = _write(store)
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    assert manifest["key"] == KEY and manifest["stage"] == "calibrate"
    assert manifest["params"] == {"x": 1} and manifest["metadata"] == {"answer": 42}
    assert set(manifest["files"]) == {"weights.bin", "sub/note.txt"}
    assert manifest["files"]["weights.bin"]["size"] == len(b"payload")
    assert store.get("calibrate", KEY).metadata == {"answer": 42}


def test_failed_build_leaves_no_artifact_and_no_temporary(store):
    def build(out):
        (out / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), store.lock("calibrate", KEY):
        store.write("calibrate", KEY, build, {})
    assert store.get("calibrate", KEY) is None
    assert list((store.root / "calibrate").iterdir()) == []


def test_killed_writer_leaves_only_a_temporary_that_is_never_read_and_is_swept(store, tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pipeline.store import ArtifactStore
        store = ArtifactStore({str(store.root)!r})
        def build(out):
            (out / "weights.bin").write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)
        with store.lock("calibrate", {KEY!r}):
            store.write("calibrate", {KEY!r}, build, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list((store.root / "calibrate").glob(f"{TMP_PREFIX}*"))
    assert len(leftovers) == 1
    assert store.get("calibrate", KEY) is None
    assert store.stale_temporaries() == leftovers, "a dead writer's lock is free, so its temporary is stale"
    gc(store, older_than_s=None, max_bytes=None, keep=set())
    assert not leftovers[0].exists()


@pytest.mark.parametrize("damage", ["flip", "missing", "truncate_manifest", "no_manifest", "resize"])
def test_damage_is_detected_and_the_artifact_discarded(store, damage, caplog):
    artifact = _write(store)
    weights = artifact.path / "weights.bin"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[3] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        (artifact.path / "sub" / "note.txt").unlink()
    elif damage == "truncate_manifest":
        manifest = artifact.path / MANIFEST
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "no_manifest":
        (artifact.path / MANIFEST).unlink()
    elif damage == "resize":
        weights.write_bytes(b"payload-and-more")
    assert store.get("calibrate", KEY) is None
    assert not artifact.path.exists()
    assert caplog.text.count("damaged artifact calibrate") == 1


def test_same_size_flip_with_restored_mtime_is_caught_by_a_deep_check(store):
    artifact = _write(store)
    weights = artifact.path / "weights.bin"
    st = weights.stat()
    weights.write_bytes(b"pAyload")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.get("calibrate", KEY) is not None, "the fast check trusts size and mtime"
    assert store.get("calibrate", KEY, deep=True) is None


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_committed_files_get_the_umask_modes_but_a_file_linked_in_keeps_its_owners(store, tmp_path, umask):
    owned_elsewhere = tmp_path / "user-weights.bin"
    owned_elsewhere.write_bytes(b"the user's own private file")
    owned_elsewhere.chmod(0o600)

    def build(out):
        with os.fdopen(os.open(out / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:  # like safetensors
            fh.write(b"payload")
        scratch = tempfile.mkdtemp(dir=out, prefix="scratch")  # 0700
        (out / scratch / "note.txt").write_text("hello")
        os.link(owned_elsewhere, out / "linked.bin")
        return {}

    previous = os.umask(umask)
    try:
        with store.lock("calibrate", KEY):
            artifact = store.write("calibrate", KEY, build, {})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [artifact.path, *artifact.path.rglob("*")]}
    assert modes["weights.bin"] == modes["note.txt"] == modes[MANIFEST] == 0o666 & ~umask
    assert [mode for name, mode in modes.items() if name == KEY or name.startswith("scratch")] == [0o777 & ~umask] * 2
    assert modes["linked.bin"] == 0o600, "a file with other links is not the store's to change"


def _hold_key_lock(store) -> subprocess.Popen:
    """Another process holding KEY's lock for a second; returns once it holds it."""
    script = textwrap.dedent(f"""
        import time
        from pipeline.store import ArtifactStore
        store = ArtifactStore({str(store.root)!r})
        with store.lock("calibrate", {KEY!r}):
            print("locked", flush=True)
            time.sleep(1.0)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_serialises_writers_across_processes(store, tmp_path):
    holder = _hold_key_lock(store)
    started = time.monotonic()
    with store.lock("calibrate", KEY):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.3, "the second writer must wait for the first"


def test_fsck_takes_the_key_lock_gc_takes_to_remove_an_artifact(store):
    _write(store)
    holder = _hold_key_lock(store)
    started = time.monotonic()
    assert store.fsck() == []
    waited = time.monotonic() - started
    holder.wait()
    assert waited > 0.3, "fsck must wait while another process holds the key"


def test_gc_by_size_keeps_published_keys(store):
    kept = _write(store, key="cd" * 32, content=b"k" * 1000)
    time.sleep(0.01)
    dropped = _write(store, key="ef" * 32, content=b"d" * 1000)
    removed = gc(store, older_than_s=None, max_bytes=10, keep={kept.key})
    assert [a.key for a in removed] == [dropped.key]
    assert store.get("calibrate", kept.key) is not None
    assert store.get("calibrate", dropped.key) is None


def test_unwritable_cache_is_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(BadInput, match="not writable"):
        ArtifactStore(blocker / "cache").ensure_writable()
