"""File helpers the store, its remote tier, publishing and run records share: hashing, hashed copies, atomic JSON,
links, modes that follow the umask, and recognising a full disk. No project imports: everything may use it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashed(src: Path, dst: Path) -> tuple[int, str]:
    """Copy `src` to the new file `dst` (its mode from the umask, never a link), returning the size and sha256 of
    the bytes written, hashed as they are copied."""
    digest, size = hashlib.sha256(), 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as source, open(dst, "xb") as copy:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            copy.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def umask() -> int:
    """The process umask, read without changing it where Linux exposes it (os.umask can only read by setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def normalise_modes(directory: Path) -> None:
    """Give the files and folders under `directory` the modes the umask gives new ones: writers such as safetensors
    create private (0600) files, which would stay unreadable to the other users of a shared cache or engines/.
    A file with other hard links (a model file linked in from the user's folder) is left alone: its mode is not
    ours to change."""
    mask = umask()
    for path in (directory, *directory.rglob("*")):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            wanted = 0o777 & ~mask
        elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            wanted = (0o777 if st.st_mode & stat.S_IXUSR else 0o666) & ~mask
        else:
            continue
        if stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(path, wanted)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so a reader sees the old file or the new one, never a torn one."""
    part = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    with open(part, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)


def link(src: Path, dst: Path) -> None:
    """Hard-link a stored file (same bytes, no copy; artifacts are never edited in place); copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """link() every file under `src` into `dst`, keeping relative paths, except files named in `skip`."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.rglob("*"):
        if file.is_file() and file.name not in skip:
            link(file, dst / file.relative_to(src))


def no_space(exc: BaseException) -> bool:
    """Writers report a full disk as OSError(ENOSPC) or, like safetensors, only in their message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc)
