"""The shared tier of the artifact store on any fsspec URL: a mounted path, file://, s3://, gs://, ...

Stages read and write local files, so every process keeps its local store; this tier is what several machines (a
Ray cluster, CI runners) share. What holds, and why, on an object store as much as on a filesystem:

- No half artifact is ever visible. Files upload under a fresh `<stage>/<key>/blobs-<id>/` prefix that no reader
  looks at; the artifact appears only when `<stage>/<key>/manifest.json` is created, and a single-object PUT is
  atomic on S3, GCS and Azure (a reader gets the whole object or nothing; S3 reads are strongly consistent since
  2020). Readers still check each downloaded file's size and sha256 against the manifest.
- One commit per key. The manifest is created exclusively (fsspec mode "xb": O_EXCL on a filesystem, a conditional
  PUT with `If-None-Match: *` on S3); a second producer's create fails, it deletes its own blobs and keeps the
  winner's artifact. Keys are content addresses, so either artifact would have been correct.
- One producer per key, as a lease. `.locks/<stage>-<key>.json` is created exclusively with an owner and an expiry
  and renewed by a heartbeat while the stage runs; waiters poll it, and break it once expired (its producer died).
  Object stores have no compare-and-delete, so two waiters breaking one expired lease in the same instant can both
  build: duplicate work, never a corrupt or half artifact, because the commit above has one winner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import BadInput, HostLacks
from pipeline.files import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class RemoteDamaged(Exception):
    """A remote artifact whose files do not match its manifest."""


class RemoteStore:
    def __init__(self, url: str, *, lease_s: float = 60.0, poll_s: float = 1.0) -> None:
        import fsspec

        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise BadInput(f"remote store {url}: {exc}; install the fsspec driver for it (e.g. s3fs for s3://)") from None
        self.url = url
        self.lease_s = lease_s
        self.poll_s = poll_s

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def manifest(self, stage: str, key: str) -> dict | None:
        """The committed manifest, or None when the artifact is absent (or its manifest unreadable)."""
        try:
            with self.fs.open(self._path(stage, key, MANIFEST), "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("remote artifact %s/%s has an unreadable manifest: ignored", stage, key[:12])
            return None
        except OSError as exc:
            raise HostLacks(f"remote store {self.url} unreadable ({exc}); check its URL and credentials") from None

    def pull(self, stage: str, key: str, manifest: dict, dest: Path) -> None:
        """Download the artifact's files into `dest`, checking each against the manifest."""
        blobs = manifest["remote"]["blobs"]
        for name, expected in manifest["files"].items():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._path(stage, key, blobs, name), str(target))
            except FileNotFoundError:
                raise RemoteDamaged(f"{name} is missing") from None
            if target.stat().st_size != expected["size"] or sha256_file(target) != expected["sha256"]:
                raise RemoteDamaged(f"{name} differs from its recorded sha256")

    def push(self, stage: str, key: str, local_dir: Path, manifest: dict) -> None:
        """Upload blobs first, then create the manifest exclusively: the commit point."""
        if self.manifest(stage, key) is not None:
            return
        blobs = f"blobs-{uuid.uuid4().hex[:12]}"
        try:
            for name in manifest["files"]:
                target = self._path(stage, key, blobs, name)
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
                self.fs.put_file(str(local_dir / name), target)
            committed = {**manifest, "remote": {"blobs": blobs}}
            payload = json.dumps(committed, indent=2, sort_keys=True, default=str).encode()
            try:
                with self.fs.open(self._path(stage, key, MANIFEST), "xb") as fh:
                    fh.write(payload)
            except FileExistsError:
                self.fs.rm(self._path(stage, key, blobs), recursive=True)
        except OSError as exc:
            raise HostLacks(f"could not upload {stage}/{key[:12]} to {self.url} ({exc}); "
                            "the local artifact is kept and the next run uploads it") from None

    def discard(self, stage: str, key: str) -> None:
        """Remove a damaged artifact's manifest (the commit), so the next producer can commit again."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(stage, key, MANIFEST))

    @contextlib.contextmanager
    def lease(self, stage: str, key: str) -> Iterator[None]:
        """Hold the producer lease for one key (see the module docstring for what it guarantees)."""
        path = self._path(".locks", f"{stage}-{key}.json")
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileExistsError, OSError):
            self.fs.makedirs(self._path(".locks"), exist_ok=True)
        while not self._try_acquire(path, owner):
            time.sleep(self.poll_s)
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(path, owner, stop), daemon=True)
        heartbeat.start()
        try:
            yield
        finally:
            stop.set()
            heartbeat.join()
            if (self._holder(path) or {}).get("owner") == owner:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path)

    def _lease_body(self, owner: str) -> bytes:
        return json.dumps({"owner": owner, "expires": time.time() + self.lease_s}).encode()

    def _try_acquire(self, path: str, owner: str) -> bool:
        try:
            with self.fs.open(path, "xb") as fh:
                fh.write(self._lease_body(owner))
            return True
        except FileExistsError:
            held = self._holder(path)
            if held is not None and held.get("expires", 0) < time.time():
                log.warning("breaking the expired lease of %s on %s", held.get("owner"), path)
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path)
            return False

    def _holder(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"expires": 0}  # torn by a crash mid-write: treat as expired

    def _renew(self, path: str, owner: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            if (self._holder(path) or {}).get("owner") != owner:
                log.warning("lease %s was taken over while this run held it", path)
                return
            with self.fs.open(path, "wb") as fh:
                fh.write(self._lease_body(owner))
