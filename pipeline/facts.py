"""The base of every typed artifact fact (a stage's or a build backend's metadata, stored in the manifest)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Facts(BaseModel):
    """Unknown fields are refused, so a manifest written with another shape reads as damaged or outdated and is
    rebuilt."""

    model_config = ConfigDict(extra="forbid", frozen=True)
