"""Which baselines exist and a recipe's `compare:` section. Light (pydantic only), so the recipe schema can hold it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.errors import BadInput

# Every baseline `quantpipe compare` runs (pipeline.compare.run has one registry entry per name).
NAMES = ("gptq", "nf4", "llm-int8", "ort-int8", "ort-int4")


def check_names(names: list[str]) -> list[str]:
    """Baseline names as given (hyphens or underscores), or BadInput listing the valid ones."""
    canonical = [n.strip().replace("_", "-") for n in names if n.strip()]
    unknown = [n for n in canonical if n not in NAMES]
    if unknown:
        raise BadInput(f"unknown baseline {', '.join(unknown)}; baselines are: {', '.join(NAMES)}")
    return canonical


class CompareSpec(BaseModel):
    """A recipe's `compare:` section: the baselines `quantpipe compare` runs when --baselines is not given."""

    model_config = ConfigDict(extra="forbid")
    baselines: list[str] = []

    @field_validator("baselines")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        try:
            return check_names(value)
        except BadInput as exc:  # a ValueError, so the recipe loader reports it as a field error
            raise ValueError(str(exc)) from None
