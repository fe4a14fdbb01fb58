"""Run records: one JSON file per run (passed or failed) under `<cache>/runs/`, plus `latest-<name>.json` per recipe
or matrix, so `status`, `report`, `plan` and schedulers read what happened without parsing logs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline.files import write_json_atomic
from pipeline.store import ArtifactStore


def runs_dir(store: ArtifactStore) -> Path:
    return store.root / "runs"


def latest_path(store: ArtifactStore, name: str) -> Path:
    return runs_dir(store) / f"latest-{name}.json"


def latest(store: ArtifactStore, name: str) -> dict | None:
    """The newest record written under `name`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(latest_path(store, name).read_text())
    except (OSError, ValueError):
        return None


def latest_records(store: ArtifactStore, prefix: str = "") -> list[dict]:
    """Every readable `latest-<prefix>*.json` record, by name."""
    records = []
    for path in sorted(runs_dir(store).glob(f"latest-{prefix}*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write(store: ArtifactStore, name: str, record: dict, started: float) -> Path:
    """Store `record` as this run's own file and as the latest one for `name`; returns the run's own file."""
    runs = runs_dir(store)
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started))}-{name}-{os.getpid()}.json"
    write_json_atomic(path, record)
    write_json_atomic(latest_path(store, name), record)
    return path
