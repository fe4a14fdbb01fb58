"""The artifact store: `<root>/<stage>/<key>/` directories, each complete or absent.

A stage writes into a private temporary directory; the manifest (file sizes and sha256) is written last and the
directory is renamed into place, so a killed run never leaves a half artifact under a real key. A file lock per key
lets concurrent runs share one build. Every read checks the manifest; a damaged artifact is discarded and rebuilt.
A reader that knows the stage's facts type (Stage.Facts) has the manifest's metadata validated too: metadata that does
not fit is an outdated or damaged artifact, discarded and rebuilt the same way.
A read checks sizes and modification times; a deep read (an input of a stage about to run, `fsck`) re-hashes every
file. Committed files get the modes the process umask gives new files, whatever mode their writer chose.
With a remote URL (`pipeline.remote`), artifacts missing here are pulled from that shared tier and new ones pushed to it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import BadInput, HostLacks
from pipeline.files import fsync, link_tree, no_space, normalise_modes, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
SCRATCH_PREFIX = ".scratch-"  # a stage's resumable work (per-layer calibration checkpoints), kept across kills
NOT_STAGES = ("runs", "tools")  # run records and builder caches live beside the stage directories


class FactsMismatch(TypeError):
    """A stage returned metadata that does not fit its own facts type: a bug in that stage, nothing is stored."""


def _holds_part(part: str, part_key: str) -> Callable[[dict], bool]:
    return lambda manifest: manifest.get("parts", {}).get(part) == part_key


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict
    facts: Any = field(default=None, compare=False)  # the metadata as its stage's Facts, when read with that type

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.get("files", {}).values())


class ArtifactStore:
    def __init__(self, root: str | os.PathLike, remote: str | None = None) -> None:
        from pipeline.remote import RemoteStore

        self.root = Path(root).expanduser().absolute()
        self.remote = RemoteStore(remote) if remote else None

    @staticmethod
    def default_root() -> Path:
        return Path(os.environ.get("QUANTPIPE_CACHE") or Path.home() / ".cache" / "quantpipe")

    def ensure_writable(self) -> None:
        """Fail early, with the fix, when the cache directory cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise BadInput(
                f"cache directory {self.root} is not writable ({exc.strerror}); "
                "pass --cache-dir or set QUANTPIPE_CACHE to a writable directory"
            ) from None

    def path_for(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def scratch_for(self, stage: str, key: str) -> Path:
        """Where a stage building `key` keeps work a killed run can resume from: tied to the key, so another
        recipe or model never sees it, and removed when the artifact commits."""
        return self.root / stage / f"{SCRATCH_PREFIX}{key}"

    def digest(self, path: Path) -> str:
        """sha256 of a file's content, memoised by path, size and mtime: big weights are hashed once."""
        st = path.stat()
        memo_path = self.root / ".digests.json"
        stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        if stamp not in memo:
            memo[stamp] = sha256_file(path)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                write_json_atomic(memo_path, memo)
            except OSError:
                pass  # a read-only cache only costs a rehash next time
        return memo[stamp]

    def lock(self, stage: str, key: str) -> AbstractContextManager:
        """One producer per key: a file lock here, plus the remote tier's lease when there is one."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        local = FileLock(locks / f"{stage}-{key}.lock")
        return self._both(local, self.remote.lease(stage, key)) if self.remote else local

    @staticmethod
    @contextmanager
    def _both(*locks: AbstractContextManager) -> Iterator[None]:
        with ExitStack() as stack:
            for held in locks:
                stack.enter_context(held)
            yield

    def peek(self, stage: str, key: str, *, facts: Any = None) -> Artifact | None:
        """What `get` would return, without side effects (nothing discarded, downloaded or touched): for `plan`.
        An artifact only in the remote tier comes with the local path `get` would pull it to."""
        path = self.path_for(stage, key)
        if path.is_dir():
            manifest, problem = self._check(path, stage, key, deep=False)
            parsed, problem = (None, problem) if problem else _read_facts(manifest, facts)
            if not problem:
                return Artifact(stage, key, path, manifest, parsed)
        if self.remote and (manifest := self.remote.manifest(stage, key)) is not None:
            parsed, problem = _read_facts(manifest, facts)
            return None if problem else Artifact(stage, key, path, manifest, parsed)
        return None

    def get(self, stage: str, key: str, *, deep: bool = False, facts: Any = None) -> Artifact | None:
        """The artifact if present and intact, pulled from the remote tier if only there; a damaged one is
        discarded (with a warning) and None returned. With `facts` (a Stage.Facts type) the artifact comes with its
        metadata validated as that type, and metadata that does not fit counts as damage."""
        path = self.path_for(stage, key)
        if not path.is_dir():
            return self._pull(stage, key, facts) if self.remote else None
        manifest, problem = self._check(path, stage, key, deep)
        parsed, problem = (None, problem) if problem else _read_facts(manifest, facts)
        if problem:
            self.discard(stage, key, problem)
            return self._pull(stage, key, facts) if self.remote else None
        try:
            os.utime(path)  # last-used time, for gc
        except OSError:
            pass
        if self.remote:
            self.remote.push(stage, key, path, manifest)  # heals a remote tier that lost it or missed the upload
        return Artifact(stage, key, path, manifest, parsed)

    def _pull(self, stage: str, key: str, facts: Any = None) -> Artifact | None:
        from pipeline.remote import RemoteDamaged

        manifest = self.remote.manifest(stage, key)
        if manifest is None:
            return None
        if problem := _read_facts(manifest, facts)[1]:
            log.warning("damaged remote artifact %s/%s (%s): discarded, it will be rebuilt", stage, key[:12], problem)
            self.remote.discard(stage, key)
            return None
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self.remote.pull(stage, key, manifest, tmp)
        except RemoteDamaged as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("damaged remote artifact %s/%s (%s): discarded, it will be rebuilt", stage, key[:12], exc)
            self.remote.discard(stage, key)
            return None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        normalise_modes(tmp)
        for name in manifest["files"]:
            fsync(tmp / name)
        local = {k: v for k, v in manifest.items() if k != "remote"}
        # pull checked every size and sha256 already; only the modification times are this disk's
        local["files"] = {name: {**entry, "mtime_ns": (tmp / name).stat().st_mtime_ns}
                          for name, entry in manifest["files"].items()}
        write_json_atomic(tmp / MANIFEST, local)
        final = self.path_for(stage, key)
        try:
            os.rename(tmp, final)
        except OSError:  # another process pulled it first
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(stage, key, facts=facts)

    def write(self, stage: str, key: str, build: Callable[[Path], Any], record: dict, *, facts: Any = None) -> Artifact:
        """Run `build(tmp_dir) -> metadata`, then publish the directory under its key atomically.

        The caller holds `lock(stage, key)`. `record` (params, inputs, environment) goes into the manifest. With
        `facts` (a Stage.Facts type), metadata that does not fit it is refused (FactsMismatch) and nothing is stored.
        """
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.time()
        try:
            parsed, metadata = _produced_facts(stage, build(tmp), facts)
            normalise_modes(tmp)
            manifest = {
                **record,
                "stage": stage,
                "key": key,
                "metadata": metadata,
                "files": self._inventory(tmp),
                "host": socket.gethostname(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(time.time() - started, 3),
            }
            write_json_atomic(tmp / MANIFEST, manifest)
            fsync(tmp)
            final = self.path_for(stage, key)
            if final.exists():
                self._discard(final)
            os.rename(tmp, final)
            fsync(stage_dir)
            self._discard(self.scratch_for(stage, key))
            if self.remote:
                self.remote.push(stage, key, final, manifest)
        except BaseException as exc:
            full = no_space(exc) or self._disk_full()  # measured before the partial files are freed
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise HostLacks(
                    f"no space left on the device holding {self.root} while writing the {stage} artifact; "
                    "free space or pass --cache-dir on a larger disk (nothing was stored)"
                ) from exc
            raise
        return Artifact(stage, key, final, manifest, parsed)

    def artifacts(self, stage: str | None = None) -> Iterator[Artifact]:
        """Every artifact (of one stage, when given) with a readable manifest (no deep check), for ls and gc."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if stage_dir.name in NOT_STAGES or stage not in (None, stage_dir.name):
                continue
            for path in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                try:
                    manifest = json.loads((path / MANIFEST).read_text())
                except (OSError, ValueError):
                    manifest = {}
                yield Artifact(stage_dir.name, path.name, path, manifest)

    def find(self, stage: str, matches: Callable[[dict], bool], *, facts: Any = None) -> Artifact | None:
        """An intact local artifact of `stage` whose manifest satisfies `matches`."""
        for candidate in self.artifacts(stage):
            if candidate.manifest and matches(candidate.manifest):
                if (artifact := self.get(stage, candidate.key, facts=facts)) is not None:
                    return artifact
        return None

    def link_parts(self, stage: str, parts: dict[str, str], out: Path, *, facts: Any = None) -> dict[str, Artifact]:
        """Hard-link into `out` each part (a subfolder; part name -> part key) that an intact artifact of `stage`
        already holds under the same part key (its manifest's `parts`); the artifact each linked part came from."""
        linked = {}
        for part, part_key in parts.items():
            earlier = self.find(stage, _holds_part(part, part_key), facts=facts)
            if earlier is not None:
                link_tree(earlier.path / part, out / part)
                linked[part] = earlier
        return linked

    def discard(self, stage: str, key: str, problem: str) -> None:
        """Drop a damaged artifact, saying so once; the next run that needs it rebuilds it."""
        log.warning("damaged artifact %s/%s (%s): discarded, it will be rebuilt", stage, key[:12], problem)
        self._discard(self.path_for(stage, key))

    def remove(self, artifact: Artifact) -> None:
        with self.lock(artifact.stage, artifact.key):
            self._discard(artifact.path)

    def fsck(self, *, repair: bool = False) -> list[tuple[Artifact, str]]:
        """Re-hash every artifact against its manifest: (artifact, problem) for each damaged one, discarded when
        `repair`. Each check holds the key's lock, the one gc takes to remove an artifact, so gc never deletes one
        between its check and its report."""
        damaged = []
        for artifact in self.artifacts():
            with self.lock(artifact.stage, artifact.key):
                if not artifact.path.is_dir():
                    continue  # removed (by gc or a run) before the lock was ours
                _, problem = self._check(artifact.path, artifact.stage, artifact.key, deep=True)
                if problem:
                    damaged.append((artifact, problem))
                    if repair:
                        self._discard(artifact.path)
        return damaged

    def stale_temporaries(self) -> list[Path]:
        """Temporary directories no live writer holds (left by a killed run)."""
        stale = []
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            stage, key_prefix = tmp.parent.name, tmp.name[len(TMP_PREFIX):].split("-")[0]
            held = any(self._is_locked(lock) for lock in (self.root / ".locks").glob(f"{stage}-{key_prefix}*.lock"))
            if not held:
                stale.append(tmp)
        return stale

    def orphan_scratch(self, older_than_s: float | None) -> list[Path]:
        """Scratch areas no live writer holds whose artifact committed (a kill after the commit), or that nobody
        resumed within `older_than_s`. A fresh one is kept: it is what the next run resumes from."""
        now = time.time()
        orphans = []
        for scratch in self.root.glob(f"*/{SCRATCH_PREFIX}*"):
            stage, key = scratch.parent.name, scratch.name[len(SCRATCH_PREFIX):]
            if self._is_locked(self.root / ".locks" / f"{stage}-{key}.lock"):
                continue
            stale = older_than_s is not None and now - scratch.stat().st_mtime > older_than_s
            if stale or self.path_for(stage, key).is_dir():
                orphans.append(scratch)
        return orphans

    @staticmethod
    def _is_locked(lock_path: Path) -> bool:
        try:
            with FileLock(lock_path, timeout=0):
                return False
        except Timeout:
            return True

    def _check(self, path: Path, stage: str, key: str, deep: bool) -> tuple[dict, str | None]:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return {}, "no manifest: an interrupted write"
        except (OSError, ValueError):
            return {}, "manifest unreadable"
        if manifest.get("key") != key or manifest.get("stage") != stage:
            return manifest, "manifest names another artifact"
        for name, expected in manifest.get("files", {}).items():
            file = path / name
            try:
                st = file.stat()
            except OSError:
                return manifest, f"{name} is missing"
            if st.st_size != expected["size"]:
                return manifest, f"{name} has {st.st_size} bytes, expected {expected['size']}"
            if (deep or st.st_mtime_ns != expected["mtime_ns"]) and sha256_file(file) != expected["sha256"]:
                return manifest, f"{name} content differs from its recorded sha256"
        return manifest, None

    @staticmethod
    def _inventory(directory: Path) -> dict:
        files = {}
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            fsync(file)
            st = file.stat()
            files[file.relative_to(directory).as_posix()] = {
                "size": st.st_size,
                "sha256": sha256_file(file),
                "mtime_ns": st.st_mtime_ns,
            }
        return files

    def _discard(self, path: Path) -> None:
        trash = self.root / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{path.parent.name}-{path.name[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        shutil.rmtree(target, ignore_errors=True)

    def _disk_full(self) -> bool:
        try:
            return shutil.disk_usage(self.root).free < (1 << 20)
        except OSError:
            return False


def gc(store: ArtifactStore, *, older_than_s: float | None, max_bytes: int | None, keep: set[str],
       dry_run: bool = False) -> list[Artifact]:
    """Remove artifacts unused for `older_than_s`, then least recently used ones until the store fits `max_bytes`.

    Keys in `keep` (what engines/ publishes) are never removed. Stale temporaries and orphaned scratch areas
    (`ArtifactStore.orphan_scratch`) are always swept.
    """
    now = time.time()
    candidates = sorted((a for a in store.artifacts() if a.key not in keep), key=lambda a: a.path.stat().st_mtime)
    doomed = [a for a in candidates if older_than_s is not None and now - a.path.stat().st_mtime > older_than_s]
    if max_bytes is not None:
        total = sum(a.size for a in store.artifacts()) - sum(a.size for a in doomed)
        for artifact in candidates:
            if total <= max_bytes:
                break
            if artifact not in doomed:
                doomed.append(artifact)
                total -= artifact.size
    if not dry_run:
        for artifact in doomed:
            store.remove(artifact)
        for tmp in [*store.stale_temporaries(), *store.orphan_scratch(older_than_s)]:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(store.root / ".trash", ignore_errors=True)
    return doomed


def _read_facts(manifest: dict, facts: Any) -> tuple[Any, str | None]:
    """A manifest's metadata as `facts` (unchecked when None), or the problem that makes the artifact unusable."""
    metadata = manifest.get("metadata", {})
    if facts is None:
        return metadata, None
    try:
        return _adapter(facts).validate_python(metadata), None
    except ValidationError as exc:
        return None, f"metadata does not fit its facts ({_first_error(exc)}): outdated or damaged"


def _produced_facts(stage: str, produced: Any, facts: Any) -> tuple[Any, Any]:
    """What a stage returned, validated as `facts`, and its JSON form for the manifest."""
    if facts is None:
        return produced, produced
    adapter = _adapter(facts)
    try:
        parsed = adapter.validate_python(produced)
    except ValidationError as exc:
        raise FactsMismatch(f"the {stage} stage returned metadata that does not fit its facts: "
                            f"{_first_error(exc)}") from exc
    return parsed, adapter.dump_python(parsed, mode="json", fallback=str)


@functools.cache
def _adapter(facts: Any) -> TypeAdapter:
    return TypeAdapter(facts)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc']) or 'metadata'}: {error['msg']}"
