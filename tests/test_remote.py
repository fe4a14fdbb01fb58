"""The shared (fsspec) tier of the artifact store: machines with their own local store share one remote, see only
committed artifacts, check what they download, and build each key once. Run on a local fsspec filesystem and, where
moto is installed, on a local S3-compatible server."""

import json
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pipeline import runner
from pipeline.errors import HostLacks
from pipeline.recipe import load_recipe
from pipeline.remote import RemoteStore
from pipeline.store import ArtifactStore
from tests.toy_stages import calls, run_concurrently, toy_chain


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory):
    """A bucket on a moto S3 server on loopback (skipped where moto's server mode is not installed)."""
    pytest.importorskip("moto.server", reason="moto[server] not installed: S3 tier untested here")
    pytest.importorskip("s3fs", reason="s3fs not installed: S3 tier untested here")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mp = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}.items():
        mp.setenv(name, value)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    for _ in range(100):
        try:
            fs.mkdir("quantpipe-test")
            break
        except Exception:  # server still starting
            time.sleep(0.1)
    yield "s3://quantpipe-test/cache"
    server.terminate()
    mp.undo()


@pytest.fixture(params=["file", "s3"])
def remote_url(request, tmp_path):
    return f"file://{tmp_path / 'remote'}" if request.param == "file" else request.getfixturevalue("s3_url") + \
        f"/{tmp_path.name}"


def _outputs(store: ArtifactStore) -> dict:
    return {(a.stage, a.key): (a.path / "out.txt").read_bytes() for a in store.artifacts()}


def test_a_second_machine_reuses_what_the_first_built(tmp_path, remote_url):
    calls_file = tmp_path / "calls.txt"
    first, second = (ArtifactStore(tmp_path / name, remote=remote_url) for name in ("a", "b"))
    built = runner.run(load_recipe("fp8"), first, stages=toy_chain(calls_file)).outcomes
    assert [s.hit for s in runner.plan(load_recipe("fp8"), second, stages=toy_chain())] == [True, True, True]
    reused = runner.run(load_recipe("fp8"), second, stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in built] == ["built"] * 3 and [o.status for o in reused] == ["hit"] * 3
    assert calls(calls_file) == ["load", "calibrate", "export"]
    assert _outputs(first) == _outputs(second)


def test_uploaded_blobs_without_a_manifest_are_invisible(tmp_path, remote_url, monkeypatch):
    store = ArtifactStore(tmp_path / "a", remote=remote_url)

    def crash_before_commit(self, *args, **kwargs):
        raise ConnectionError("killed after uploading the blobs")

    real_open = store.remote.fs.open
    monkeypatch.setattr(store.remote.fs, "open", lambda path, mode="rb", **kw: crash_before_commit(None)
                        if mode == "xb" and path.endswith("manifest.json") else real_open(path, mode, **kw))
    with pytest.raises(HostLacks, match="could not upload load/.*the next run uploads it"):
        runner.run(load_recipe("fp8"), store, until="load", stages=toy_chain())
    monkeypatch.undo()
    other = ArtifactStore(tmp_path / "b", remote=remote_url)
    assert [s.hit for s in runner.plan(load_recipe("fp8"), other, until="load", stages=toy_chain())] == [False]
    assert [o.status for o in runner.run(load_recipe("fp8"), store, until="load", stages=toy_chain()).outcomes] == \
        ["hit"], "the local artifact was kept"
    assert [s.hit for s in runner.plan(load_recipe("fp8"), other, until="load", stages=toy_chain())] == [True]


def test_a_damaged_remote_artifact_is_rebuilt_not_used(tmp_path, caplog):
    remote_url = f"file://{tmp_path / 'remote'}"
    calls_file = tmp_path / "calls.txt"
    runner.run(load_recipe("fp8"), ArtifactStore(tmp_path / "a", remote=remote_url), stages=toy_chain(calls_file))
    blob = next((tmp_path / "remote" / "calibrate").glob("*/blobs-*/out.txt"))
    blob.write_text(blob.read_text().replace("32", "33"))
    outcomes = runner.run(load_recipe("fp8"), ArtifactStore(tmp_path / "b", remote=remote_url),
                          stages=toy_chain(calls_file)).outcomes
    assert [o.status for o in outcomes] == ["hit", "built", "hit"]
    assert "damaged remote artifact calibrate" in caplog.text
    assert calls(calls_file) == ["load", "calibrate", "export", "calibrate"]


def test_a_lost_remote_artifact_is_uploaded_again_from_a_local_copy(tmp_path):
    remote_url = f"file://{tmp_path / 'remote'}"
    runner.run(load_recipe("fp8"), ArtifactStore(tmp_path / "a", remote=remote_url), stages=toy_chain())
    shutil.rmtree(tmp_path / "remote" / "export")
    runner.run(load_recipe("fp8"), ArtifactStore(tmp_path / "a", remote=remote_url), stages=toy_chain())
    outcomes = runner.run(load_recipe("fp8"), ArtifactStore(tmp_path / "b", remote=remote_url),
                          stages=toy_chain()).outcomes
    assert [o.status for o in outcomes] == ["hit", "hit", "hit"]


def _run_on_machine(local, remote_url, calls_file):
    runner.run(load_recipe("fp8"), ArtifactStore(local, remote=remote_url), stages=toy_chain(calls_file, delay=0.5))


def test_machines_racing_on_one_remote_build_each_key_once(tmp_path, remote_url):
    calls_file = tmp_path / "calls.txt"
    machines = [(tmp_path / f"m{i}", remote_url, calls_file) for i in range(2)]
    assert run_concurrently(_run_on_machine, machines) == [0, 0]
    assert sorted(calls(calls_file)) == ["calibrate", "export", "load"]


def test_an_expired_lease_of_a_dead_producer_is_broken(tmp_path):
    remote = RemoteStore(f"file://{tmp_path / 'remote'}", lease_s=0.3, poll_s=0.05)
    lock = tmp_path / "remote" / ".locks" / "load-k.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"owner": "dead-host:1", "expires": time.time() + 0.2}))
    started = time.time()
    with remote.lease("load", "k"):
        assert json.loads(lock.read_text())["owner"] != "dead-host:1"
    assert time.time() - started < 5
    assert not lock.exists()


def test_a_live_lease_is_renewed_while_its_stage_runs(tmp_path):
    remote = RemoteStore(f"file://{tmp_path / 'remote'}", lease_s=0.3, poll_s=0.05)
    lock = tmp_path / "remote" / ".locks" / "load-k.json"
    with remote.lease("load", "k"):
        first = json.loads(lock.read_text())["expires"]
        time.sleep(0.5)
        assert json.loads(lock.read_text())["expires"] > first, "the heartbeat must push the expiry forward"
