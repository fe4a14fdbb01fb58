"""The one record an artifact's key is computed from. The runner keys stages with it, stages with parts (export's
formats) key each part with it, and every manifest and run record stores it, so a key can be recomputed from them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KeyRecord:
    stage: str  # a stage's name, or "<stage>/<part>" for one part of its artifact
    stage_version: str
    code: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """sha256 over everything the artifact depends on (the encoding every cached key was made with)."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def part(self, name: str, params: dict[str, Any]) -> KeyRecord:
        """The record of one part of this artifact: the same inputs, code and environment, only the fields it reads."""
        return dataclasses.replace(self, stage=f"{self.stage}/{name}", params=params)

    def to_json(self) -> dict[str, Any]:
        """The record as manifests and run records store it, beside their own `stage` field."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "stage"}

    @classmethod
    def from_json(cls, stage: str, data: dict[str, Any]) -> KeyRecord:
        """The record a manifest or a run record holds (other fields in `data` are ignored)."""
        return cls(stage, str(data.get("stage_version")), str(data.get("code")), data.get("params", {}),
                   data.get("inputs", {}), data.get("environment", {}))
