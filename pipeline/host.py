"""Facts about this host that artifacts depend on: library versions and GPUs. Cheap: nothing heavy is imported."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@functools.cache
def version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(dists: tuple[str, ...]) -> dict[str, str | None]:
    return {d: version(d) for d in dists}


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    sm: int
    memory_mib: int


@functools.cache
def gpus() -> tuple[Gpu, ...]:
    """GPUs visible through nvidia-smi (empty when there is no driver)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    query = "--query-gpu=index,name,compute_cap,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    found = []
    for line in out.strip().splitlines():
        index, name, cap, memory = (p.strip() for p in line.split(","))
        major, minor = cap.split(".")
        found.append(Gpu(int(index), name, int(major) * 10 + int(minor), int(float(memory))))
    return tuple(found)


def describe() -> dict:
    """Host identity recorded in manifests (no secrets: no environment variables)."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "gpus": [f"{g.name} (sm_{g.sm})" for g in gpus()],
    }


class PeakMemory:
    """Peak resident memory (bytes) of this process during a block, from the OS: Linux resets the high-water mark
    through /proc/self/clear_refs, so each stage's peak is its own. Where that is not possible the process's
    lifetime peak is reported, an upper bound. Subprocesses count when one peaked higher than any before it."""

    def __enter__(self) -> PeakMemory:
        release_memory()  # an earlier stage's garbage in this process goes back to the OS, not into this peak
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        self.children_before = _children_peak()
        self.bytes = 0
        return self

    def __exit__(self, *exc_info) -> None:
        children = _children_peak()
        self.bytes = max(_own_peak(), children if children > self.children_before else 0)


def release_memory() -> None:
    """Hand memory freed by Python back to the OS: collect cycles (models hold some), then ask glibc to return free
    heap pages, which it otherwise keeps, so the next step's peak does not stack on the last one's garbage."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def large_frees_to_os(threshold: int = 1 << 17) -> None:
    """Make glibc serve every allocation of `threshold` bytes or more with its own mapping, returned to the OS when
    freed. By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, after which
    weight-sized arrays come from the heap and stay in the process when freed: a loop over weights (each loaded,
    converted, dropped) then grows RSS by their sum rather than by the largest. Setting it once fixes it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc
        pass


def _own_peak() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
