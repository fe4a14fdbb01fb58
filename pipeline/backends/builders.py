"""The code behind each build backend, by name: one Builder per backend module (pipeline/backends/__init__.py
describes them). Only the build stage and verify import this, so only their keys cover the builders' code."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Union

from pydantic import Field

from pipeline import backends
from pipeline.backends import Builder

_ADDED: dict[str, Builder] = {}


def register(builder: Builder) -> Builder:
    """Add a backend: its description and the code that builds it."""
    backends.register(builder.info)
    _ADDED[builder.info.name] = builder
    return builder


@functools.cache
def _built_in() -> dict[str, Builder]:
    from pipeline.backends.tensorrt_rtx import TensorRTRTX
    from pipeline.backends.trtllm import TrtllmEngine, TrtllmPytorch

    return {b.info.name: b for b in (TensorRTRTX(), TrtllmEngine(), TrtllmPytorch())}


def builder(name: str) -> Builder:
    return {**_built_in(), **_ADDED}[name]


def facts_of_builders() -> Any:
    """The build stage's facts type: any registered builder's facts, told apart by their `backend` field."""
    return _union(tuple(b.Facts for b in {**_built_in(), **_ADDED}.values()))


@functools.cache
def _union(kinds: tuple[type, ...]) -> Any:
    return Annotated[Union[kinds], Field(discriminator="backend")]  # noqa: UP007 (a union built from a tuple)
