"""Published artifacts under engines/: what gc must keep."""

from __future__ import annotations

import json
from pathlib import Path

PROVENANCE = "build.json"


def published_keys(engines_dir: Path) -> set[str]:
    """Every artifact key a published build.json references."""
    keys: set[str] = set()
    for provenance in Path(engines_dir).glob(f"**/{PROVENANCE}"):
        try:
            keys.update(json.loads(provenance.read_text()).get("keys", {}).values())
        except (OSError, ValueError):
            continue
    return keys
